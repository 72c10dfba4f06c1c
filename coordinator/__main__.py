from coordinator.admin.cli import main

main()
