"""The paramsel demo as a Flower App.

- :mod:`paramsel_demo.client_app`: the ClientApp, an FL4Health-style client on paramsel's drop-in
  exchangers (push and pull through the paramsel service) training on a non-IID shard of scikit-learn's
  digits (:mod:`paramsel_demo.task`);
- :mod:`paramsel_demo.server_app`: the ServerApp, whose strategy aggregates the selections through the
  service's Aggregate rpc (FL4Health's rule), then a dense FedAvg run beside it, and writes the figures
  (:mod:`paramsel_demo.figures`);
- :mod:`paramsel_demo.launcher`: ``paramsel-demo``, which starts ``paramsel serve`` and a Flower
  SuperLink on the Simulation Engine, runs the app with ``flwr run``, and prints the table;
- :mod:`paramsel_demo.compare`: ``paramsel-demo --compare``'s exchanges (dense, FL4Health's sparse values,
  sparse updates with error feedback), settings and figures, run by the same two apps.
"""
