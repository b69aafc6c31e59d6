#![doc = "wip"]
