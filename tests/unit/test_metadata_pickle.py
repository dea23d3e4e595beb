"""The `.metadata` stand-ins against PyTorch DCP's own classes."""

from __future__ import annotations

import io
import pickle

import torch

from qwen35_bridge.formats.torch_dist import metadata_pickle as mp


def test_stand_ins_pickle_to_the_bytes_of_dcps_own_metadata() -> None:
    """The same Metadata built from DCP's classes and pickled as DCP pickles it (`pickle.dump`)
    gives the very bytes the stand-ins give; unpickled, they build DCP's objects."""
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    key, bias, objects = (
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.final_layernorm.weight",
        "content_metadata",
    )
    ours = mp.metadata(
        {
            key: mp.tensor_storage(torch.bfloat16, (8, 4), [((0, 0), (4, 4)), ((4, 0), (4, 4))]),
            bias: mp.tensor_storage(torch.float32, (4,), [((0,), (4,))]),
            objects: mp.bytes_storage(),
        },
        {
            mp.storage_index(objects, None, None): mp.storage_info("__0_0.distcp", 0, 17),
            mp.storage_index(key, (0, 0), 0): mp.storage_info("__0_0.distcp", 17, 700),
            mp.storage_index(key, (4, 0), 1): mp.storage_info("__1_0.distcp", 0, 700),
            mp.storage_index(bias, (0,), 0): mp.storage_info("__0_0.distcp", 717, 600),
        },
        "/some/run/release",
    )
    stream = io.BytesIO()
    mp.dump(ours, stream)
    save_id = ours.state["storage_meta"].state["save_id"]

    def chunk(offsets, sizes):
        return md.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))

    theirs = md.Metadata(
        state_dict_metadata={
            key: md.TensorStorageMetadata(
                md.TensorProperties(dtype=torch.bfloat16),
                torch.Size([8, 4]),
                [chunk([0, 0], [4, 4]), chunk([4, 0], [4, 4])],
            ),
            bias: md.TensorStorageMetadata(
                md.TensorProperties(dtype=torch.float32), torch.Size([4]), [chunk([0], [4])]
            ),
            objects: md.BytesStorageMetadata(),
        },
        planner_data=None,
        storage_data={
            md.MetadataIndex(objects): fs._StorageInfo("__0_0.distcp", 0, 17),
            md.MetadataIndex(key, [0, 0], 0): fs._StorageInfo("__0_0.distcp", 17, 700),
            md.MetadataIndex(key, [4, 0], 1): fs._StorageInfo("__1_0.distcp", 0, 700),
            md.MetadataIndex(bias, [0], 0): fs._StorageInfo("__0_0.distcp", 717, 600),
        },
        storage_meta=md.StorageMeta(checkpoint_id="/some/run/release", save_id=save_id),
        version=fs.CURRENT_DCP_VERSION,
    )
    assert stream.getvalue() == pickle.dumps(theirs)
    loaded = pickle.loads(stream.getvalue())
    assert type(loaded) is md.Metadata and loaded == theirs
    assert [k.index for k in loaded.storage_data] == [None, 0, 1, 0]  # not part of equality
