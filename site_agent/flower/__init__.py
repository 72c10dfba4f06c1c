"""The site agent inside a Flower deployment: a Flower ``ClientApp`` (:mod:`site_agent.flower.clientapp`).

It owns only the glue from a Flower message to the site's own code: the site's config (``site.toml`` named by the
SuperNode's ``--node-config``, or a simulation partition), its policy checks, the site trainer of every mode
(:func:`site_agent.agent.make_trainer`), the egress filters (:func:`site_agent.agent.egress_delta`), the egress
guard and the privacy ledger. Nothing is copied from the task loop; Flower replaces only the transport.

``flwr`` is imported only here (and lazily by :mod:`fedcommon.flowerwire`); ``import site_agent`` never imports it.
"""
