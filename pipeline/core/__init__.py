"""The shared contract: what the driver and the actors both read and write (the spec, errors, storage,
shard descriptors, the output's layout, records and lease, the kind registry, images in and out). The only
driver package actor code may import besides `imagemill.provenance`; it imports no other imagemill room.
"""
