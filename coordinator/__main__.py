from coordinator.admin_cli import main

main()
