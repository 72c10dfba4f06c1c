"""Admin: AdminService (admin certificates only), the engine's control actions, read views, and the
``fedbridge-admin`` CLI with its client.

Owns: start/pause/resume/stop/publish/withdraw/revoke as actions on the engine, and the tables the CLI and the
dashboard show.

May import: everything in coordinator (it drives the engine); the CLI talks to a running coordinator over gRPC.
"""
