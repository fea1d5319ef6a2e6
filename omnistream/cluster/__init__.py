"""omnistream on many GPUs: N engine replicas under Ray Serve behind one endpoint, each
session pinned to the replica that holds its KV (docs/cluster.md).

    omnistream serve --model DIR --replicas 4                   # one replica per GPU
    omnistream serve --model DIR --replicas 2 --replica-gpus 0.5    # two sharing one GPU

One concept per module: placement (session ids name their replica; routes; load ranking),
router (the Ray Serve RequestRouter), replica (the Serve deployment: an engine + build_app),
report (what a replica reports), served (the replica header, requests per session), lost
(410 for a session whose replica is gone), drain (a replica that takes no new work), ingress
(in Serve's proxy: a live socket whose replica died is told so), prefix_keys / prefix_ingress /
prefix_affinity (stateless requests go where their prompt prefix was served: the keys, computed
in Serve's proxy, and the ranking), ops (GET /v1/replicas, the cluster's /metrics),
metrics_merge (replica-labelled exposition), spec (typed contracts), deploy (the Serve
application and the config-file builder), local (a loopback Ray cluster), launch (the CLI).

Ray is an optional extra (`pip install 'omnistream[cluster]'`): placement, spec and launch
import without it; the modules that need it import it at the top.
"""
