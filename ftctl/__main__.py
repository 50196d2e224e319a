from ftctl.cli.main import main

main()
