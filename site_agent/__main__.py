from site_agent.cli import main

main()
