using System.Text;

namespace LoRAHub.Safetensors.Tests;

public sealed class RoundTripTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    /// <summary>Two elements of each dtype with distinctive little-endian bytes.</summary>
    private static readonly (SafetensorsDType DType, byte[] Data)[] Samples =
    [
        (SafetensorsDType.F64, [.. BitConverter.GetBytes(1.25), .. BitConverter.GetBytes(-3e300)]),
        (SafetensorsDType.F32, [.. BitConverter.GetBytes(0.5f), .. BitConverter.GetBytes(float.NaN)]),
        (SafetensorsDType.F16, [.. BitConverter.GetBytes((Half)1.5), .. BitConverter.GetBytes(Half.NegativeInfinity)]),
        (SafetensorsDType.BF16, [0x80, 0x3F, 0x00, 0xC0]), // 1.0 and -2.0
        (SafetensorsDType.I64, [.. BitConverter.GetBytes(long.MinValue), .. BitConverter.GetBytes(42L)]),
        (SafetensorsDType.I32, [.. BitConverter.GetBytes(int.MaxValue), .. BitConverter.GetBytes(-7)]),
        (SafetensorsDType.I16, [.. BitConverter.GetBytes((short)-300), .. BitConverter.GetBytes((short)300)]),
        (SafetensorsDType.I8, [0x80, 0x7F]),
        (SafetensorsDType.U8, [0x00, 0xFF]),
        (SafetensorsDType.BOOL, [0x01, 0x00]),
    ];

    public static TheoryData<SafetensorsDType, byte[]> KnownBytes
    {
        get
        {
            var data = new TheoryData<SafetensorsDType, byte[]>();
            foreach (var (dtype, bytes) in Samples) data.Add(dtype, bytes);
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(KnownBytes))]
    public void Each_dtype_round_trips_its_exact_bytes(SafetensorsDType dtype, byte[] data)
    {
        var path = temp["one.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("x", dtype, [2], data)]);
        using var file = SafetensorsFile.Open(path);
        var info = file["x"];
        Assert.Equal(dtype, info.DType);
        Assert.Equal([2L], info.Shape);
        Assert.Equal(data, file.GetBytes("x").ToArray());
        Assert.Equal(data, file.ReadBytes("x"));
    }

    [Fact]
    public void All_dtypes_in_one_file_keep_order_bytes_and_metadata()
    {
        var path = temp["all.safetensors"];
        var entries = Samples.Select(s => SafetensorsEntry.FromBytes($"t.{s.DType}", s.DType, [2], s.Data)).ToList();
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcödé + <tags> & \"quotes\"", ["empty"] = "" };
        SafetensorsWriter.Write(path, entries, metadata);

        using var file = SafetensorsFile.Open(path);
        Assert.Equal(entries.Select(e => e.Name), file.Tensors.Select(t => t.Name));
        Assert.Equal(metadata, file.Metadata);
        foreach (var (dtype, data) in Samples)
            Assert.Equal(data, file.ReadBytes($"t.{dtype}"));
        // Written in order and contiguous: each tensor starts where the previous one ended.
        for (var i = 1; i < file.Tensors.Count; i++)
            Assert.Equal(file.Tensors[i - 1].End, file.Tensors[i].Begin);
        Assert.Equal(new FileInfo(path).Length, file.DataStart + file.Tensors[^1].End);
    }

    [Theory]
    [InlineData("")]
    [InlineData("a")]
    [InlineData("abcdefgh")]
    [InlineData("a.much.longer.tensor.name.weight")]
    public void The_header_is_padded_with_spaces_to_a_multiple_of_8(string name)
    {
        var path = temp["pad.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes(name, SafetensorsDType.U8, [3], [1, 2, 3])]);
        var bytes = File.ReadAllBytes(path);
        var headerLength = (int)BitConverter.ToUInt64(bytes, 0);
        Assert.Equal(0, headerLength % 8);
        var header = Encoding.UTF8.GetString(bytes, 8, headerLength);
        var json = header.TrimEnd(' ');
        Assert.EndsWith("}", json);
        Assert.True(header.Length - json.Length < 8);
        Assert.Equal([1, 2, 3], bytes[(8 + headerLength)..]);
    }

    [Fact]
    public void An_empty_file_matches_the_reference_writer_byte_for_byte()
    {
        // {} plus six spaces, as the reference implementation serializes an empty tensor map.
        var path = temp["empty.safetensors"];
        SafetensorsWriter.Write(path, []);
        Assert.Equal([8, 0, 0, 0, 0, 0, 0, 0, (byte)'{', (byte)'}', 32, 32, 32, 32, 32, 32], File.ReadAllBytes(path));
        using var file = SafetensorsFile.Open(path);
        Assert.Empty(file.Tensors);
        Assert.Empty(file.Metadata);
    }

    [Fact]
    public void Scalars_and_zero_size_tensors_round_trip()
    {
        var path = temp["shapes.safetensors"];
        SafetensorsWriter.Write(path,
        [
            SafetensorsEntry.FromBytes("empty.first", SafetensorsDType.F32, [0], []),
            SafetensorsEntry.FromBytes("scalar", SafetensorsDType.F64, [], BitConverter.GetBytes(2.5)),
            SafetensorsEntry.FromBytes("empty.middle", SafetensorsDType.I64, [4, 0, 2], []),
            SafetensorsEntry.FromBytes("vector", SafetensorsDType.U8, [2], [7, 8]),
            SafetensorsEntry.FromBytes("empty.last", SafetensorsDType.BF16, [0, 0], []),
        ]);
        using var file = SafetensorsFile.Open(path);
        Assert.Empty(file["scalar"].Shape);
        Assert.Equal(1, file["scalar"].ElementCount);
        Assert.Equal(2.5, BitConverter.ToDouble(file.GetBytes("scalar")));
        Assert.Equal([4L, 0L, 2L], file["empty.middle"].Shape);
        Assert.Equal(0, file["empty.middle"].ByteLength);
        Assert.True(file.GetBytes("empty.first").IsEmpty);
        Assert.Empty(file.ReadBytes("empty.last"));
        Assert.Equal([7, 8], file.ReadBytes("vector"));
    }

    [Fact]
    public void Lookup_api()
    {
        var path = temp["lookup.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("a", SafetensorsDType.U8, [1], [5])]);
        using var file = SafetensorsFile.Open(path);
        Assert.True(file.Contains("a"));
        Assert.False(file.Contains("A"));
        Assert.True(file.TryGet("a", out var info));
        Assert.Equal(1, info.ByteLength);
        Assert.False(file.TryGet("b", out _));
        var e = Assert.Throws<KeyNotFoundException>(() => file["b"]);
        Assert.Contains("'b'", e.Message);
        Assert.Contains(path, e.Message);
        Assert.Equal(path, file.Path);
    }

    [Fact]
    public void Spans_are_refused_after_dispose()
    {
        var path = temp["disposed.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("a", SafetensorsDType.U8, [1], [5])]);
        var file = SafetensorsFile.Open(path);
        file.Dispose();
        file.Dispose(); // idempotent
        Assert.Throws<ObjectDisposedException>(() => file.GetBytes("a").Length);
    }

    [Fact]
    public void Streaming_callbacks_may_write_in_pieces_and_dispose_their_stream()
    {
        var path = temp["stream.safetensors"];
        SafetensorsWriter.Write(path,
        [
            new SafetensorsEntry("a", SafetensorsDType.I32, [3], 12, stream =>
            {
                using (stream) // must not close the file
                    for (var i = 1; i <= 3; i++) stream.Write(BitConverter.GetBytes(i));
            }),
            new SafetensorsEntry("b", SafetensorsDType.U8, [2], 2, stream => { stream.WriteByte(9); stream.Flush(); stream.WriteByte(10); }),
        ]);
        using var file = SafetensorsFile.Open(path);
        Assert.Equal([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0], file.ReadBytes("a"));
        Assert.Equal([9, 10], file.ReadBytes("b"));
    }

    [Fact]
    public void A_file_can_be_replaced_while_it_is_open()
    {
        if (OperatingSystem.IsWindows()) return; // Windows refuses to rename over a mapped file
        var path = temp["live.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("a", SafetensorsDType.U8, [1], [1])]);
        using var old = SafetensorsFile.Open(path);
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("a", SafetensorsDType.U8, [2], [2, 2])]);
        Assert.Equal([1], old.ReadBytes("a")); // the mapping keeps the old contents
        using var current = SafetensorsFile.Open(path);
        Assert.Equal([2, 2], current.ReadBytes("a"));
    }
}
