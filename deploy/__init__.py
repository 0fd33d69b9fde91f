"""Server-side deployment files (nginx, Kubernetes, Prometheus, Grafana), installed with recorun:
the nginx balancer renders ``nginx/grpc_balancer.conf.template`` at run time."""
