"""Privacy: central differential privacy (clip, noise, account) and the coordinator's side of secure aggregation.

Owns: the DP accounting of central-DP rounds and the SecAgg stages of a round (rosters, routed shares, unmasking).

May import: protos, fedcommon, strategies, coordinator.{config,errors}, coordinator.rounds.store.
"""
