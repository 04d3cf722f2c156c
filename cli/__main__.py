from divfast.cli.main import main

main()
