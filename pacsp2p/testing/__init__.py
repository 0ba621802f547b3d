"""Test/bench helpers that run REAL processes: Orthanc, DCMTK tools, pacsp2p peers.

ports     free_port, free_ports, wait_for_port
procs     Process (stop by PID only), log_tail
dcmtk     dcmtk(), echo, wait_for_echo, storescu, findscu, StoreSCP, dataset_sha256
orthanc   Orthanc (throwaway server; REST upload)
peer      Peer (twistd -n pacsp2p --config FILE)
datasets  synthetic DICOM files and the C-FIND corpus
"""
from .dcmtk import StoreSCP, dataset_sha256, dcmtk, echo, findscu, storescu, wait_for_echo
from .orthanc import Orthanc
from .peer import Peer
from .ports import LOOPBACK, free_port, free_ports, wait_for_port
from .procs import Process, log_tail

__all__ = ["LOOPBACK", "Orthanc", "Peer", "Process", "StoreSCP", "dataset_sha256", "dcmtk",
           "echo", "findscu", "free_port", "free_ports", "log_tail", "storescu",
           "wait_for_echo", "wait_for_port"]
