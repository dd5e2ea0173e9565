"""What ``virtio-user --help`` prints: ``cli.main`` writes this instead of building the
parser (under TCG, importing argparse and the commands and building the parser cost as
much again as starting the interpreter). Made by the parser itself, with the argparse of
Python 3.11, for a width of 80 columns (what argparse uses when the output is not
a terminal); ``cli`` prints it only for that Python and that width.

Generated: do not edit. ``tests/unit/test_startup.py`` fails when the parser's help
differs, and says how to make this file again.
"""

PYTHON = (3, 11)
COLUMNS = 80
TEXT = """\
usage: virtio-user [-h] [--device BDF] [--backend {uio,vfio}]
                   [--transport {auto,legacy,modern}] [--timeout SECONDS]
                   [--rebind] [--wait {poll,interrupt,hybrid}]
                   [--ring {auto,split,packed}] [--queues N] [--progress]
                   [--debug]
                   COMMAND ...

A user-space driver for virtio-blk PCI devices, legacy (1af4:1001) and modern
(1af4:1042).

positional arguments:
  COMMAND
    info                show the device and its features
    read                read sectors
    write               write sectors
    flush               flush the write cache
    id                  print the device ID (GET_ID)
    discard             discard sectors
    write-zeroes        zero sectors
    bench               measure IOPS, bandwidth and latency at a queue depth
    nbd                 serve the device to the kernel as /dev/nbdN (mkfs,
                        mount)
    ublk                serve the device to the kernel as /dev/ublkbN (add,
                        del N, list)
    shell               one device, many commands: a prompt with submit, reap
                        and ring

options:
  -h, --help            show this help message and exit
  --device BDF          PCI address (default: the first virtio-blk device,
                        1af4:1001 or 1af4:1042)
  --backend {uio,vfio}  who owns the PCI function: uio_pci_generic (the
                        default) or vfio-pci behind an IOMMU
  --transport {auto,legacy,modern}
                        virtio interface: modern (virtio 1.x) where the device
                        has it (auto, the default), or insist on one
  --timeout SECONDS     per-wait deadline (default 5)
  --rebind              hand the device back to virtio-pci afterwards
  --wait {poll,interrupt,hybrid}
                        how to wait for completions: spin on the ring
                        (default), sleep until the device interrupts, or spin
                        briefly then sleep
  --ring {auto,split,packed}
                        virtqueue layout: packed where the device offers
                        VIRTIO_F_RING_PACKED (auto, the default), or insist on
                        one
  --queues N            request queues to set up on a VIRTIO_BLK_F_MQ device
                        (default: as many as it offers, at most one per CPU)
  --progress            report progress on stderr
  --debug               tracebacks on errors
"""
