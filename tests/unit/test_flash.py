"""Reading a bmap file: what flash copies and verifies, range by range."""
import pytest

from appliance import flash

BMAP = """<?xml version="1.0" ?>
<bmap version="2.0">
    <ImageSize> 16384 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 4 </BlocksCount>
    <MappedBlocksCount> 3 </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BlockMap>
        <Range chksum="{a}"> 0-1 </Range>
        <Range{b}> 3 </Range>
    </BlockMap>
</bmap>
"""
SHA_A, SHA_B = "a" * 64, "b" * 64


def test_a_bmap_is_read_range_by_range(tmp_path):
    path = tmp_path / "image.bmap"
    path.write_text(BMAP.format(a=SHA_A, b=f' chksum="{SHA_B}"'))
    bm = flash.load_bmap(path)
    assert (bm.image_size, bm.block_size) == (16384, 4096)
    assert bm.ranges == ((0, 1, SHA_A), (3, 3, SHA_B))
    assert bm.mapped_bytes == 3 * 4096


def test_a_range_without_a_checksum_makes_the_bmap_unusable(tmp_path):
    # It used to be read with None for a checksum: flash then wrote the whole target and
    # blamed the image ("changed while it was written") instead of the bmap.
    path = tmp_path / "image.bmap"
    path.write_text(BMAP.format(a=SHA_A, b=""))
    with pytest.raises(flash.FlashError, match="not a usable bmap file.*no chksum"):
        flash.load_bmap(path)
