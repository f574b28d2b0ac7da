"""A containerd proxy snapshotter: minifs drivers behind containerd's
`containerd.services.snapshots.v1.Snapshots` gRPC API on a unix socket.

containerd loads it as `[proxy_plugins.minifs] type = "snapshot"`, so `ctr`,
image unpacking and Kubernetes (CRI `snapshotter = "minifs"`) run containers
on any minifs driver. Nothing here is imported by `minifs --help`: grpc costs
a few hundred milliseconds to import.
"""
