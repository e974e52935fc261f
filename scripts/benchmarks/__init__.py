"""The benchmark's measurements, one module each; ``scripts/bench`` runs them and prints the report.

common      settings, addresses, statistics, output          run         the namespaces, stack and references of a run
processes   CPU and memory of the stack's processes          references  the kernel's reference servers
ping        ping round trips and a ping's latency budget     udp         UDP echoes per second
tcp         TCP connections per second, bulk, CPU per GB     ipv6        the same over IPv6, fragmented pings
memory      idle stack PSS, idle connections' RSS, peak RSS  synflood    connections under a SYN flood
http_service  ab and curl against the HTTP file service      iperf       iperf3 each way
pure        compiled against interpreted                     latency     ``stackctl latency`` budgets
report      the table's rows, the table                      scaling     ``--scaling``: 1, 2 and 4 TCP workers
attach      ``--attach``: attach mode against slirp4netns
tcp_core    not part of a run: the TCP core's cost per connection, in-process
            (``python -m scripts.benchmarks.tcp_core``)
"""
