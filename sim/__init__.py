"""sim: multi-region runs on one machine.

It owns the launcher that starts a coordinator and island processes on loopback, the
data-parallel baseline measured in the same run, the WAN emulator, the chaos injector, reports
and plots, and the scale model.
"""
