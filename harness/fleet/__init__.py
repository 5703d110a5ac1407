"""The fleet over SSH: connections, host keys, deployment and the SSH transport.

Submodules are imported where needed so that `import harness.fleet.yaml_lines`
(used by the inventory) does not pull in Fabric.
"""
