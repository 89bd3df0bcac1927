from llamba_cli.cli.app import entry

entry()
