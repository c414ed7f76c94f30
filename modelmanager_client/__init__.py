"""``modelmanager_client``: the spelling existing deployment docs use for :mod:`mmfs.client`.

    from modelmanager_client import DownloadInfo, modelmanager_download, snapshot_download
"""

from mmfs.client import DownloadInfo, modelmanager_download, snapshot_download

__all__ = ["DownloadInfo", "modelmanager_download", "snapshot_download"]
