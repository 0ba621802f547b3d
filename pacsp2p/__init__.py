"""pacsp2p: distinct PACS archives clustered into one cooperative peer-to-peer archive.

After Ribeiro, Costa & Oliveira, "Clustering of distinct PACS archives using a
cooperative peer-to-peer network", Comput. Methods Programs Biomed. 2012.
"""

__version__ = "0.1.0"
