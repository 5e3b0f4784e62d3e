from meraser.cli import main

main()
