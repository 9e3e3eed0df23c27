using System.Text;

namespace LoRAHub.Safetensors.Tests;

/// <summary>Files spelled out byte by byte from the format description, so the reader is tested without our writer.</summary>
public sealed class HandWrittenFileTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    // 191 bytes of JSON. "w" is I16 [513, -2], "s" a scalar F32 -1.5, "e" an empty U8 [0, 3] at the end.
    private const string Json =
        """{"__metadata__":{"format":"pt"},"w":{"dtype":"I16","shape":[2],"data_offsets":[0,4]},"s":{"dtype":"F32","shape":[],"data_offsets":[4,8]},"e":{"dtype":"U8","shape":[0,3],"data_offsets":[8,8]}}""";

    private static readonly byte[] Data =
    [
        0x01, 0x02, 0xFE, 0xFF, // w: 513 = 0x0201 and -2 = 0xFFFE, little-endian
        0x00, 0x00, 0xC0, 0xBF, // s: -1.5f = 0xBFC00000, little-endian
    ];

    [Fact]
    public void Reads_a_padded_file_written_by_hand()
    {
        byte[] prefix = [0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]; // 192 = 191 bytes of JSON + 1 space of padding
        var path = temp["hand.safetensors"];
        File.WriteAllBytes(path, [.. prefix, .. Encoding.ASCII.GetBytes(Json + " "), .. Data]);
        Assert.Equal(191, Json.Length);

        using var file = SafetensorsFile.Open(path);
        Check(file, dataStart: 200);
    }

    [Fact]
    public void Reads_an_unpadded_file_whose_data_section_is_unaligned()
    {
        // Nothing in the format forces padding, and older writers did not pad: the data then starts at byte 199.
        byte[] prefix = [0xBF, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]; // 191
        var path = temp["unpadded.safetensors"];
        File.WriteAllBytes(path, [.. prefix, .. Encoding.ASCII.GetBytes(Json), .. Data]);

        using var file = SafetensorsFile.Open(path);
        Check(file, dataStart: 199);
    }

    private static void Check(SafetensorsFile file, long dataStart)
    {
        Assert.Equal(dataStart, file.DataStart);
        Assert.Equal(["w", "s", "e"], file.Tensors.Select(t => t.Name));
        Assert.Equal("pt", Assert.Single(file.Metadata).Value);

        var w = file["w"];
        Assert.Equal(SafetensorsDType.I16, w.DType);
        Assert.Equal([2L], w.Shape);
        Assert.Equal((0L, 4L), (w.Begin, w.End));
        Assert.Equal([513, -2], [BitConverter.ToInt16(file.GetBytes("w")[..2]), BitConverter.ToInt16(file.GetBytes("w")[2..])]);

        var s = file["s"];
        Assert.Empty(s.Shape);
        Assert.Equal(1, s.ElementCount);
        Assert.Equal(-1.5f, BitConverter.ToSingle(file.GetBytes("s")));

        var e = file["e"];
        Assert.Equal([0L, 3L], e.Shape);
        Assert.Equal(0, e.ElementCount);
        Assert.True(file.GetBytes("e").IsEmpty);
    }
}
