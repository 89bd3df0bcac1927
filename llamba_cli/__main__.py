from llamba_cli.cli.launch import entry

entry()
