"""The operator's tools: ``tandem up`` / ``down`` (a local cluster in the background),
``tandem ctl`` (get, describe, drain, mode, agent, policy, audit) and ``tandem top``.
Everything goes through the nodes' Admin RPCs with an operator identity; the client never
writes etcd itself."""
