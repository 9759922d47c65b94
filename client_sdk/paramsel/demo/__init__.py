"""``paramsel demo``: a complete federated training run on this machine through the paramsel service.

Three roles, each a ``paramsel`` subcommand and a module here:

- ``paramsel demo-client`` (:mod:`paramsel.demo.client`): trains an MLP on a non-IID shard of
  scikit-learn's digits (:mod:`paramsel.demo.data`, :mod:`paramsel.demo.model`), pushes through the
  service with the drop-in exchangers, submits the packed list to the coordinator, pulls the aggregate;
- ``paramsel demo-coordinator`` (:mod:`paramsel.demo.coordinator`): aggregates each round through the
  service (``paramsel.client.aggregate_sparse_coo`` / ``aggregate_layers``) and gathers the figures;
- ``paramsel demo`` (:mod:`paramsel.demo.runner`): starts the service, the coordinator and the clients
  as processes and reports (:mod:`paramsel.demo.report`).

Coordinator and clients speak the small numpy-over-gRPC protocol of :mod:`paramsel.demo.protocol`.
"""
