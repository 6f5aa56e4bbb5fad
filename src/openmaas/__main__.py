from openmaas.cli.main import main

main()
