"""The lab: emulated Docker hosts in throwaway network namespaces, for tests and benchmarks.

Everything here is pure standard library (plus :mod:`calicnm.store.etcd` to probe an etcd)
and ``subprocess`` calls to ``ip``, ``nsenter``, ``unshare``, ``dockerd``, ``etcd`` and the
Debian docker client.  It must run as root.  Modules, lowest first:

- :mod:`lab.procs`: errors, cleanup steps, the ``Managed`` context-manager base, names,
  commands, the process table, ``Process``;
- :mod:`lab.paths`: where the repository and its venv's ``calicnm`` are;
- :mod:`lab.netns`: ``Netns``, a named network namespace;
- :mod:`lab.fabric`: ``Fabric``, the L2 underlay the hosts attach to;
- :mod:`lab.images`: the busybox image every emulated dockerd imports;
- :mod:`lab.dockerd`: ``DockerHost``, a dockerd inside a namespace;
- :mod:`lab.etcd`: ``EtcdServer`` and the 3-member ``EtcdCluster`` on loopback, and
  ``fabric_etcd`` / ``fabric_etcd_cluster`` in the fabric;
- :mod:`lab.tls`: a throwaway CA for etcd with client certificates;
- :mod:`lab.bgp_peer`: ``BirdPeer``, an outside BGP router in a namespace;
- :mod:`lab.cluster`: ``CalicnmHost`` (namespace + calicnm node + dockerd) and ``Cluster``.

Global invariants
-----------------
* Every name the lab creates (network namespaces, interfaces, temp dirs, cgroups) starts
  with ``cnmt`` and every kernel name is at most 15 characters long.
* Nothing is ever created in, or sent to, the root network namespace, with one exception:
  :class:`lab.etcd.EtcdServer` and :class:`lab.etcd.EtcdCluster` listen on ``127.0.0.1``
  (free ports) there.  Hosts and the
  fabric live in their own namespaces, veth pairs are created directly between those
  namespaces, and the only addresses involved are ``198.18.0.0/24`` inside the fabric, the
  containers' addresses inside the hosts, and loopback.
* Every object is a context manager (:class:`lab.procs.Managed`; ``cluster`` and
  ``single_host`` wrap ``Cluster`` and ``CalicnmHost``).  ``__enter__`` either fully
  succeeds or undoes whatever it already did and re-raises.  ``__exit__`` always runs every
  cleanup step, even if earlier steps fail; failures are logged (loggers under ``lab``) and
  collected.  If the ``with`` body raised, cleanup errors
  are only logged, so the original error is never masked; otherwise they are raised at the
  end as one :class:`lab.procs.TeardownError`.
* Every wait is bounded.  A process that does not exit after ``SIGKILL`` within the bound is
  reported as a cleanup error rather than waited on forever.
* After teardown nothing is left: namespaces deleted (which destroys their veths, bridges and
  iptables state), every process started in them killed (dockerd, its containerd, the
  containerd shims and the container processes, which live in namespaces of their own),
  container cgroups removed, temp dirs removed.  dockerd runs in a private mount namespace,
  so its mounts vanish with its processes; it runs under a subreaper wrapper, so its
  double-forked shims are reaped too instead of lingering as zombies under PID 1 (only if the
  wrapper itself is SIGKILLed do killed processes stay zombies until PID 1 reaps them,
  ~2 s on this VM).  The only host paths that may be created (empty,
  and deliberately kept because concurrent sessions share them) are the mount points
  ``/run/docker/plugins`` and ``/run/containerd``, plus ``/run/netns`` made by ``ip netns``.
"""
