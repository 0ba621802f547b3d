"""pacsp2p: distinct PACS archives clustered into one cooperative peer-to-peer archive.

After Ribeiro, Costa & Oliveira, "Clustering of distinct PACS archives using a
cooperative peer-to-peer network", Comput. Methods Programs Biomed. 2012.
"""

# the release; status also names the catalog schema and the overlay protocol it speaks
# (docs/upgrading.md: which releases can run side by side)
__version__ = "0.2.0.dev0"
