# Everything a fresh machine with Python 3.11+ and make needs: `make run`, `make test`.
# `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What running needs (the package alone), and what the tests and benchmarks add.
RUN_STAMP := $(VENV)/.run-installed
STAMP := $(VENV)/.installed
# What `make core` built: "compiled" or "pure Python" (the core `dmq-gateway --version`
# names), remade when a source of the core or setup.py changes.
CORE_STAMP := $(VENV)/.core
CORE_SOURCES := $(wildcard app/dmq/*.py app/dmq/*.c) app/kamailio/htable_codec.py \
    app/kamailio/replica.py setup.py
DEMO := .demo
LINTED := app harness tests bench

.DEFAULT_GOAL := help
.PHONY: help run test test-compiled core compiled uncompiled lint bench bench-kdmq bench-node bench-ingress bench-e2e bench-fanout bench-loss bench-abuse bench-tls bench-kamailio-join openapi demo demo-stop clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The editable install is pure Python (DMQ_GATEWAY_COMPILE=0); $(CORE_STAMP) then builds
# the compiled core in place where it can. The `compiled` extra is what that build needs.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	DMQ_GATEWAY_COMPILE=0 $(BIN)/pip install --quiet -e '.[compiled]'
	touch $@

# The extras include the package: a venv set up for the tests can run it too.
$(STAMP): pyproject.toml | $(BIN)/python
	DMQ_GATEWAY_COMPILE=0 $(BIN)/pip install --quiet -e '.[test,bench,compiled]'
	touch $@ $(RUN_STAMP)

# The compiled core where a C compiler and this Python's headers are present; elsewhere
# setup.py says in one line why the core stays pure Python, and that is not an error.
# build_ext copies a module's small loader only when it changed, and app/__init__.py
# calls an extension older than its source stale: date them all to this build.
$(CORE_STAMP): $(CORE_SOURCES) | $(RUN_STAMP)
	@DMQ_GATEWAY_COMPILE=$${DMQ_GATEWAY_COMPILE:-auto} $(BIN)/python setup.py --quiet build_ext --inplace
	@find app/dmq app/kamailio -name '*.so' -exec touch {} +
	@$(BIN)/python -c 'import app; print(app.core())' >$@.new && mv $@.new $@
	@$(BIN)/dmq-gateway --version

## help: list the targets
help:
	@sed -n 's/^## \([^:]*\): \(.*\)/\1\t\2/p' $(MAKEFILE_LIST) | expand -t 22

## run: a DMQ node on sip:127.0.0.1:5060 (a bus of one), API on :8000; ARGS='...' adds options
run: $(CORE_STAMP)
	$(BIN)/dmq-gateway serve $(ARGS)

## lint: ruff (lint + format check), mypy --strict on app and harness
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy app harness

## test: lint; the whole suite on the default core (compiled where it can be); the core's tests on pure Python
test: lint $(CORE_STAMP)
	DMQ_GATEWAY_EXPECT_COMPILED=$$(grep -qx compiled $(CORE_STAMP) && echo 1) \
	    $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	DMQ_GATEWAY_CORE=pure $(BIN)/pytest -q -p no:cacheprovider $(PURE_TESTS) $(PYTEST_ARGS)

# What also runs on the pure-Python core: the core's own tests, the real-socket ones, and
# the compiled htable mirror's (its codec and replica, no Kamailio process).
PURE_TESTS := tests/dmq tests/transport tests/compiled tests/kamailio/test_htable_codec.py \
    tests/kamailio/test_htable_replica.py

## core: build the compiled core where a C compiler and Python headers are (run and test do)
core: $(CORE_STAMP)

## compiled: build the compiled core, or fail saying why (DMQ_GATEWAY_COMPILE=1)
compiled: | $(RUN_STAMP)
	rm -f $(CORE_STAMP)
	DMQ_GATEWAY_COMPILE=1 $(MAKE) --no-print-directory core

## test-compiled: build the compiled core (or fail), then run the core's tests against it
test-compiled: compiled $(STAMP)
	DMQ_GATEWAY_EXPECT_COMPILED=1 $(BIN)/pytest -q -p no:cacheprovider $(PURE_TESTS) $(PYTEST_ARGS)

## uncompiled: remove the compiled core's artefacts (DMQ_GATEWAY_CORE=pure runs the sources without this)
uncompiled:
	rm -rf build $(CORE_STAMP)
	find app -name '*.so' -delete
	rm -f *__mypyc*.so

## openapi: regenerate openapi/openapi.json and openapi/websocket.json from the code
openapi: $(STAMP)
	$(BIN)/python -m app.api.openapi_export

## bench: every benchmark, one after the other; results in bench/results/
bench: bench-kdmq bench-node bench-ingress bench-e2e bench-fanout bench-loss bench-abuse bench-kamailio-join

## bench-kdmq: KDMQ throughput, ours vs Kamailio (needs kamailio and sipp)
bench-kdmq: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.kdmq_throughput $(BENCH_ARGS)

## bench-tls: KDMQ over TLS next to TCP and UDP, ours and Kamailio, and the cost of a join
bench-tls: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.kdmq_tls $(BENCH_ARGS)

## bench-node: the node's CPU per KDMQ request, no sockets: pure Python and compiled core
bench-node: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.node_cpu $(BENCH_ARGS)

## bench-ingress: per POST (vs minimal FastAPI and raw ASGI), batches and WebSocket publish, A to B
bench-ingress: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.ingress $(BENCH_ARGS)

## bench-e2e: HTTP POST on one gateway to a WebSocket subscriber on another
bench-e2e: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.gateway_e2e $(BENCH_ARGS)

## bench-loss: delivery through 20%/40% UDP and 40% TCP loss in a namespace lab (root, nft)
bench-loss: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.delivery_loss $(BENCH_ARGS)

## bench-fanout: WebSocket fan-out, the gateway vs a bare websockets server
bench-fanout: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.ws_fanout $(BENCH_ARGS)

## bench-abuse: every attack the bounds are for, at full size, while /v1/health is timed (BENCH_ARGS=--quick: a tenth)
bench-abuse: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.abuse $(BENCH_ARGS)

## bench-kamailio-join: a join against 1-3 Kamailio nodes, ours (one donor) next to Kamailio (root, to count bytes on lo; ~1 min)
bench-kamailio-join: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m bench.kamailio_join $(BENCH_ARGS)

## screenshots: the console's pictures in docs/console-*.png (three gateways, headless chromium)
.PHONY: screenshots
screenshots: $(STAMP)
	$(BIN)/python -m tests.console.screenshots

# Exits 0 when every gateway whose HTTP port is given sees all the others active.
export JOINED := import json, sys, urllib.request as r; ports = sys.argv[1:]; sys.exit(any(json.load(r.urlopen(f"http://127.0.0.1:{p}/v1/health", timeout=1))["active_nodes"] < len(ports) - 1 for p in ports))

## demo: three gateways on one bus in the background (SIP 5070-5074, HTTP 8070-8072, .demo/)
demo: $(CORE_STAMP)
	@mkdir -p $(DEMO)
	@for name in a b c; do \
	    if [ -f $(DEMO)/$$name.pid ] && kill -0 "$$(cat $(DEMO)/$$name.pid)" 2>/dev/null; then \
	        echo "demo gateway $$name is already running (pid $$(cat $(DEMO)/$$name.pid)); make demo-stop"; \
	        exit 1; \
	    fi; \
	done
	@# Each registers peer 'demo' (--peer: answers 200 and keeps a history to subscribe to).
	@$(BIN)/dmq-gateway serve --server-address sip:127.0.0.1:5070 --http 127.0.0.1:8070 \
	    --state-dir $(DEMO)/a --peer demo --ping-interval 5 >$(DEMO)/a.log 2>&1 & echo $$! >$(DEMO)/a.pid
	@$(BIN)/dmq-gateway serve --server-address sip:127.0.0.1:5072 --http 127.0.0.1:8071 \
	    --state-dir $(DEMO)/b --peer demo --ping-interval 5 --notification-address sip:127.0.0.1:5070 \
	    >$(DEMO)/b.log 2>&1 & echo $$! >$(DEMO)/b.pid
	@$(BIN)/dmq-gateway serve --server-address sip:127.0.0.1:5074 --http 127.0.0.1:8072 \
	    --state-dir $(DEMO)/c --peer demo --ping-interval 5 --notification-address sip:127.0.0.1:5070 \
	    >$(DEMO)/c.log 2>&1 & echo $$! >$(DEMO)/c.pid
	@for i in $$(seq 100); do \
	    $(BIN)/python -c "$$JOINED" 8070 8071 8072 2>/dev/null && break; sleep 0.2; \
	    [ $$i -lt 100 ] || { echo "the demo bus did not form in 20 s: see $(DEMO)/*.log"; exit 1; }; \
	 done
	@echo "gateway A: sip:127.0.0.1:5070 http://127.0.0.1:8070 (log $(DEMO)/a.log, pid $$(cat $(DEMO)/a.pid))"
	@echo "gateway B: sip:127.0.0.1:5072 http://127.0.0.1:8071 (log $(DEMO)/b.log, pid $$(cat $(DEMO)/b.pid))"
	@echo "gateway C: sip:127.0.0.1:5074 http://127.0.0.1:8072 (log $(DEMO)/c.log, pid $$(cat $(DEMO)/c.pid))"
	@echo "stop them with: make demo-stop"

## demo-stop: stop the demo gateways by their pids (each leaves the bus gracefully)
demo-stop:
	@for name in c b a; do \
	    pidfile=$(DEMO)/$$name.pid; \
	    [ -f $$pidfile ] || continue; \
	    pid=$$(cat $$pidfile); \
	    if kill -TERM "$$pid" 2>/dev/null; then \
	        for i in $$(seq 50); do kill -0 "$$pid" 2>/dev/null || break; sleep 0.2; done; \
	        echo "stopped demo gateway $$name (pid $$pid)"; \
	    fi; \
	    rm -f $$pidfile; \
	done

## clean: remove the virtualenv, caches, the demo's state and the compiled core
clean: uncompiled
	rm -rf $(VENV) $(DEMO) .mypy_cache .ruff_cache .pytest_cache .hypothesis
