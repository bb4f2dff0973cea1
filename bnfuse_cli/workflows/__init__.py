"""The workflows: one library function per command, each returning a report.

``fuse`` (the one path from a model to a fused model and its verdict), ``convert`` (load, fuse,
write), ``verify`` (judge a fused file against its original as deployed) and ``bench`` (time
both side by side).  They never print or exit: the CLI renders their reports.
"""
