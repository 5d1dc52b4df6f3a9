"""Shared test helpers (not tests themselves): synthetic kernels and dumps, injected
faults, the fuzzer, JSON-schema checking and the docs generator.

- :mod:`tests.helpers.synthcore`   synthetic cores: replays ``init_espfix_ap()`` per CPU
- :mod:`tests.helpers.mkcore`      ``python3 -m tests.helpers.mkcore``: write one to disk
- :mod:`tests.helpers.mkdump`      synthetic ELF / kdump-compressed / flattened vmcores
- :mod:`tests.helpers.faults`      corruptions of a synthetic kernel, by name
- :mod:`tests.helpers.fuzz`        the deterministic mutation fuzzer (``python3 -m tests.helpers.fuzz``)
- :mod:`tests.helpers.jsonschemas` parse JSON output and check it against inspector/schemas
- :mod:`tests.helpers.jsonproc`    a subprocess whose stdout is JSON lines, each checked
- :mod:`tests.helpers.gendocs`     regenerate docs/ (``python3 -m tests.helpers.gendocs``)

The VM harness is :mod:`tests.vm`; helpers run inside guests live in tests/guest.
"""
