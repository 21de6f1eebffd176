"""Password grants per second against a running stand-in, with 1, 4 and 16 concurrent clients.

    python bench_grants.py URL [SECONDS_PER_LEVEL]      (URL of an awx, generic or gateway stand-in)
"""
import sys
import threading
import time
import uuid

import requests


def main():
    url = sys.argv[1].rstrip("/")
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    mode = requests.get(url + "/_standin/health", timeout=10).json()["mode"]
    token_path = "/o/token/" if mode == "gateway" else "/api/o/token/"
    name = "bench-" + uuid.uuid4().hex[:8]
    requests.post(url + "/_standin/users", json={"username": name, "password": "pw-" + name}, timeout=30).raise_for_status()
    app = requests.post(url + "/_standin/applications", json={"name": name, "user": name}, timeout=30).json()
    auth = (app["client_id"], app["client_secret"])
    form = {"grant_type": "password", "username": name, "password": "pw-" + name}
    for clients in (1, 4, 16):
        done, errors, stop = [0], [0], time.time() + seconds
        lock = threading.Lock()

        def client():
            s = requests.Session()
            while time.time() < stop:
                r = s.post(url + token_path, data=form, auth=auth, timeout=120)
                with lock:
                    if r.status_code in (200, 201):
                        done[0] += 1
                    else:
                        errors[0] += 1
        t0 = time.time()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        print("%s: %2d clients: %5.2f password grants/s (%d in %.1f s, %d errors)"
              % (mode, clients, done[0] / wall, done[0], wall, errors[0]))


if __name__ == "__main__":
    main()
