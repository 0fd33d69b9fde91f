#!/usr/bin/env bash
# Install nginx for recorun's gRPC load balancer (server/balancer.py, `recorun-balancer`,
# tests/test_balancing.py) when it is missing: Debian's nginx-light (it has HTTP/2 and gRPC
# proxying) with apt-get, as root or with passwordless sudo. Where that is not possible it
# prints how to install it. It never fails the caller (setup.sh, .ci/run): without nginx, the
# tests that need it fail with a clear message.
# Debian's package does not start an nginx service where there is no init system (containers,
# CI); on a machine with systemd it starts the default site on port 80, as any nginx install.
set -u
have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }
note() { echo "install-nginx: $*" >&2; }
have_nginx && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    note "nginx is not installed and there is no apt-get here: install an nginx built with" \
         "HTTP/2 and gRPC proxying (tests/test_balancing.py and recorun-balancer need it)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    note "nginx is not installed and apt-get needs root: run" \
         "'sudo apt-get install -y nginx-light' (tests/test_balancing.py and" \
         "recorun-balancer need it)"
    exit 0
fi
install() {
    ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends nginx-light >&2
}
note "installing nginx-light with apt-get (recorun's gRPC load balancer runs nginx)"
if ! install; then
    note "apt-get install failed; updating the package lists and trying again"
    ${SUDO[@]+"${SUDO[@]}"} apt-get update -qq >&2 && install
fi
if have_nginx; then
    note "$(nginx -v 2>&1 || /usr/sbin/nginx -v 2>&1) installed"
else
    note "could not install nginx-light; install it by hand:" \
         "'apt-get install -y nginx-light' (tests/test_balancing.py needs it)"
fi
exit 0
