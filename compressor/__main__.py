from lowrank.cli import main

main()
