using System.Text;
using LoRAHub.Safetensors;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>safetensors round trips onto TorchSharp tensors, a hand-made file, and every corrupt-file case.</summary>
[Collection(Serial.Name)] // counts live tensors, which tests running alongside would change
public class SafetensorsTests : IDisposable
{
    private readonly string dir = Directory.CreateTempSubdirectory("lorahub-st").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    private string P(string name) => Path.Combine(dir, name);

    [Fact]
    public void Every_dtype_round_trips_with_metadata()
    {
        using var scope = NewDisposeScope();
        var tensors = new Dictionary<string, Tensor>();
        foreach (var type in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float64, ScalarType.Int64, ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte, ScalarType.Bool })
            tensors[type.ToString()] = arange(6, ScalarType.Float32).view(2, 3).to(type);
        tensors["scalar"] = tensor(3.5f);
        tensors["empty"] = zeros(0, 4);
        tensors["strided"] = arange(12, ScalarType.Float32).view(3, 4).t()[1..]; // a non-contiguous view is written row-major
        tensors["on_device"] = arange(5, ScalarType.BFloat16, TestDevice.Current);
        torchx.save_safetensors(tensors, P("all.safetensors"), new Dictionary<string, string> { ["format"] = "pt" });
        var back = torchx.load_safetensors(P("all.safetensors"));
        foreach (var (name, t) in tensors)
        {
            Assert.Equal(t.dtype, back[name].dtype);
            Assert.Equal(t.shape, back[name].shape);
            Assert.Equal(DeviceType.CPU, back[name].device_type);
            Assert.True(t.cpu().eq(back[name]).all().item<bool>(), name);
        }
        var onDevice = torchx.load_safetensors(P("all.safetensors"), TestDevice.Current);
        Assert.Equal(TestDevice.Current.type, onDevice["BFloat16"].device_type);
        Assert.Equal(new[] { 0f, 1, 2, 3, 4, 5 }, onDevice["BFloat16"].@float().cpu().data<float>().ToArray());
        using var file = SafetensorsFile.Open(P("all.safetensors"));
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal(tensors.Keys, file.Tensors.Select(t => t.Name)); // order kept
        var headerLength = BitConverter.ToUInt64(File.ReadAllBytes(P("all.safetensors")), 0);
        Assert.Equal(0UL, headerLength % 8);
        Assert.Empty(Directory.GetFiles(dir, "*.tmp-*"));
    }

    /// <summary>Bytes written by hand from the format description, independent of our writer.</summary>
    [Fact]
    public void Reads_a_file_written_byte_by_byte()
    {
        var header = """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[],"data_offsets":[8,16]}}""";
        var bytes = new List<byte>();
        bytes.AddRange(BitConverter.GetBytes((ulong)header.Length));
        bytes.AddRange(Encoding.UTF8.GetBytes(header));
        bytes.AddRange(BitConverter.GetBytes(1.5f));
        bytes.AddRange(BitConverter.GetBytes(-2f));
        bytes.AddRange(BitConverter.GetBytes(7L));
        File.WriteAllBytes(P("hand.safetensors"), bytes.ToArray());
        using var scope = NewDisposeScope();
        var t = torchx.load_safetensors(P("hand.safetensors"));
        Assert.Equal(new[] { 1.5f, -2f }, t["a"].data<float>().ToArray());
        Assert.Equal(7L, t["b"].item<long>());
        Assert.Empty(t["b"].shape);
    }

    [Fact]
    public void Atomic_write_keeps_the_old_file_when_the_writer_fails()
    {
        SafetensorsWriter.Write(P("x.safetensors"), [SafetensorsEntry.FromBytes("t", SafetensorsDType.U8, [3], [1, 2, 3])]);
        var before = File.ReadAllBytes(P("x.safetensors"));
        Assert.Throws<IOException>(() => SafetensorsWriter.Write(P("x.safetensors"),
            [new SafetensorsEntry("t", SafetensorsDType.U8, [4], 4, s => { s.WriteByte(9); throw new IOException("disk full"); })]));
        Assert.Equal(before, File.ReadAllBytes(P("x.safetensors")));
        Assert.Single(Directory.GetFiles(dir));
        Assert.Throws<InvalidOperationException>(() => SafetensorsWriter.Write(P("y.safetensors"),
            [new SafetensorsEntry("t", SafetensorsDType.U8, [4], 4, s => s.WriteByte(1))]));
        Assert.False(File.Exists(P("y.safetensors")));
    }

    private string Corrupt(string name, string header, int dataBytes, int? claimedLength = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var bytes = BitConverter.GetBytes((ulong)(claimedLength ?? h.Length)).Concat(h).Concat(new byte[dataBytes]).ToArray();
        File.WriteAllBytes(P(name), bytes);
        return P(name);
    }

    public static TheoryData<string, string, int, string> CorruptCases => new()
    {
        { "truncated-data", """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""", 8, "truncated" },
        { "unknown-dtype", """{"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,4]}}""", 4, "unknown dtype 'Q4'" },
        { "size-mismatch", """{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}""", 16, "needs 12 bytes" },
        { "negative-dim", """{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", 4, "invalid dimension" },
        { "bad-offsets", """{"w":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}""", 4, "invalid data_offsets" },
        { "overlap", """{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}""", 6, "overlap" },
        { "hole", """{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}""", 4, "hole" },
        { "not-json", """{"a": [""", 0, "not valid JSON" },
        { "missing-shape", """{"w":{"dtype":"U8","data_offsets":[0,1]}}""", 1, "'shape'" },
        { "overflow", """{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}""", 8, "overflows" },
    };

    [Theory]
    [MemberData(nameof(CorruptCases))]
    public void Corrupt_files_give_clear_errors_naming_file_and_tensor(string name, string header, int dataBytes, string expected)
    {
        var path = Corrupt(name + ".safetensors", header, dataBytes);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path));
        Assert.Contains(path, e.Message);
        Assert.Contains(expected, e.Message);
        if (header.Contains("\"w\"")) Assert.Contains("'w'", e.Message);
    }

    [Fact]
    public void A_header_length_beyond_the_file_and_tiny_files_are_rejected()
    {
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(Corrupt("lie.safetensors", "{}", 0, claimedLength: 1 << 20)));
        Assert.Contains("truncated", e.Message);
        File.WriteAllBytes(P("tiny.safetensors"), [1, 2, 3]);
        Assert.Contains("fewer than the 8-byte", Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(P("tiny.safetensors"))).Message);
    }

    [Fact]
    public void Sharded_checkpoints_round_trip_and_a_missing_shard_is_named()
    {
        var entries = Enumerable.Range(0, 5).Select(i => SafetensorsEntry.FromBytes($"layer.{i}", SafetensorsDType.U8, [100], Enumerable.Repeat((byte)i, 100).ToArray()));
        var folder = Path.Combine(dir, "sharded");
        SafetensorsWriter.WriteSharded(folder, entries, maxShardBytes: 250);
        Assert.True(File.Exists(Path.Combine(folder, "model-00001-of-00003.safetensors")));
        Assert.True(File.Exists(Path.Combine(folder, "model.safetensors.index.json")));
        using (var ckpt = ShardedSafetensors.Open(folder))
        {
            Assert.Equal(5, ckpt.Names.Count());
            Assert.Equal((byte)4, ckpt.GetBytes("layer.4")[0]);
        }
        File.Delete(Path.Combine(folder, "model-00002-of-00003.safetensors"));
        var e = Assert.Throws<SafetensorsFormatException>(() => ShardedSafetensors.Open(folder));
        Assert.Contains("model-00002-of-00003.safetensors", e.Message);
    }

    [Fact]
    public void Load_into_copies_by_key_and_names_missing_keys_and_wrong_shapes()
    {
        using var scope = NewDisposeScope();
        torchx.save_safetensors(new Dictionary<string, Tensor> { ["a"] = arange(6, ScalarType.Float32).view(2, 3), ["extra"] = ones([1]) }, P("w.safetensors"));
        var target = zeros([2, 3], device: TestDevice.Current);
        torchx.load_safetensors_into(new Dictionary<string, Tensor> { ["a"] = target }, P("w.safetensors"));
        Assert.Equal([0f, 1, 2, 3, 4, 5], target.cpu().data<float>().ToArray());

        var missing = Assert.Throws<InvalidDataException>(() => torchx.load_safetensors_into(new Dictionary<string, Tensor> { ["b"] = zeros([2, 3]) }, P("w.safetensors")));
        Assert.Contains("'b'", missing.Message);
        var shape = Assert.Throws<InvalidDataException>(() => torchx.load_safetensors_into(new Dictionary<string, Tensor> { ["a"] = zeros([3, 2]) }, P("w.safetensors")));
        Assert.Contains("[2, 3]", shape.Message);
    }

    /// <summary>bf16 bytes by hand (1.0 = 0x3F80, -2.5 = 0xC020): the loaded tensor has exactly those elements.</summary>
    [Fact]
    public void Bf16_bytes_load_as_bf16_values_and_corrupt_files_fail_before_any_tensor()
    {
        var header = """{"h":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}""";
        var bytes = BitConverter.GetBytes((ulong)header.Length).Concat(Encoding.UTF8.GetBytes(header)).Concat(new byte[] { 0x80, 0x3F, 0x20, 0xC0 }).ToArray();
        File.WriteAllBytes(P("bf16.safetensors"), bytes);
        using var scope = NewDisposeScope();
        var t = torchx.load_safetensors(P("bf16.safetensors"))["h"];
        Assert.Equal(ScalarType.BFloat16, t.dtype);
        Assert.Equal(new[] { 1f, -2.5f }, t.@float().data<float>().ToArray());
        AutogradTests.Quiesce();
        var live = torchx.LiveTensorCount;
        var path = Corrupt("bad.safetensors", """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""", 8);
        Assert.Throws<SafetensorsFormatException>(() => torchx.load_safetensors(path));
        Assert.Equal(live, torchx.LiveTensorCount);
    }
}
