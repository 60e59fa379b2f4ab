from deathstar.cli import main

main()
