from gym_collect.cli import main

main()
