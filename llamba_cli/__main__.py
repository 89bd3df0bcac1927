from llamba_cli.cli.app import main

main()
