"""The mmfs CSI node plugin: bind-mounts revisions of the node's mmfs mount into pods.

Mounts and gRPC only; it imports nothing from the mmfs data path (only the name
validators of :mod:`mmfs.names`). Entry point: ``mmfs-csi`` (:mod:`csi_driver.cli`).
"""
