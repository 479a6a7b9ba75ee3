"""The pure core of canaryd: annotations and spec, state, plan, backends, admission, judge, decide.

Owns: every rule about what a rollout does next, as functions of their inputs. Must not: do I/O,
read a clock, or import anything of canaryd outside ``canaryd.core`` or any client library
(import-linter's contracts in pyproject.toml enforce it; ``make lint`` runs them).
"""
