using System.Text;

namespace LoRAHub.Safetensors.Tests;

/// <summary>Every way a header can be wrong gives a SafetensorsFormatException naming the file, the tensor and the problem.</summary>
public sealed class CorruptFileTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private static byte[] Raw(string header, int dataBytes = 0) => RawFile.Build(header, new byte[dataBytes]);

    private static string Entry(string name, string dtype, string shape, string offsets) =>
        "{\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}}";

    /// <summary>Case name, file bytes, the tensor the message must name (or null), and a phrase it must contain.</summary>
    public static TheoryData<string, byte[], string?, string> Cases => new()
    {
        // The length prefix.
        { "empty-file", [], null, "fewer than the 8-byte" },
        { "seven-bytes", [1, 2, 3, 4, 5, 6, 7], null, "fewer than the 8-byte" },
        { "header-beyond-file", RawFile.Build("{}", claimedLength: 1234), null, "the file is truncated: the header length field says 1234 bytes but the file has only 2" },
        { "absurd-header", RawFile.Build("{}", claimedLength: 100_000_001), null, "more than the 100000000-byte limit" },
        { "huge-header", RawFile.Build("{}", claimedLength: ulong.MaxValue), null, "18446744073709551615" },
        { "zero-header", RawFile.Build(""), null, "the header is empty" },

        // The header text.
        { "not-an-object", Raw("[1,2]"), null, "not '{'" },
        { "html", Raw("<html></html>"), null, "starts with byte 0x3C" },
        { "not-utf8", RawFile.Build([(byte)'{', (byte)'"', 0xFF, 0xFE, (byte)'"', (byte)':', (byte)'1', (byte)'}']), null, "not valid UTF-8" },
        { "not-json", Raw("""{"a": ["""), null, "not valid JSON" },
        { "trailing-garbage", Raw("{}xyz"), null, "not valid JSON" },
        { "nul-padding", RawFile.Build([(byte)'{', (byte)'}', 0, 0, 0, 0, 0, 0]), null, "not valid JSON" },

        // Entry structure.
        { "entry-not-object", Raw("""{"w":5}"""), "w", "not an object" },
        { "missing-dtype", Raw("""{"w":{"shape":[1],"data_offsets":[0,1]}}""", 1), "w", "missing 'dtype'" },
        { "missing-shape", Raw("""{"w":{"dtype":"U8","data_offsets":[0,1]}}""", 1), "w", "missing 'shape'" },
        { "missing-offsets", Raw("""{"w":{"dtype":"U8","shape":[1]}}""", 1), "w", "missing 'data_offsets'" },
        { "dtype-number", Raw("""{"w":{"dtype":4,"shape":[1],"data_offsets":[0,1]}}""", 1), "w", "'dtype' is a JSON number" },
        { "shape-string", Raw(Entry("w", "U8", "\"1\"", "[0,1]"), 1), "w", "'shape' is a JSON string" },
        { "shape-string-dim", Raw(Entry("w", "U8", "[\"1\"]", "[0,1]"), 1), "w", "invalid dimension \"1\"" },
        { "shape-fraction", Raw(Entry("w", "U8", "[1.5]", "[0,1]"), 1), "w", "invalid dimension 1.5" },
        { "shape-exponent", Raw(Entry("w", "U8", "[1e0]", "[0,1]"), 1), "w", "invalid dimension 1e0" },
        { "shape-too-big", Raw(Entry("w", "U8", "[9223372036854775808]", "[0,1]"), 1), "w", "invalid dimension" },
        { "offsets-object", Raw(Entry("w", "U8", "[1]", "{}"), 1), "w", "invalid data_offsets {}" },
        { "offsets-strings", Raw(Entry("w", "U8", "[1]", "[\"0\",\"1\"]"), 1), "w", "invalid data_offsets" },
        { "offsets-three", Raw(Entry("w", "U8", "[1]", "[0,1,2]"), 2), "w", "invalid data_offsets [0,1,2]" },
        { "offsets-one", Raw(Entry("w", "U8", "[1]", "[0]"), 1), "w", "invalid data_offsets [0]" },
        { "offsets-null", Raw(Entry("w", "U8", "[1]", "[null,1]"), 1), "w", "invalid data_offsets" },
        { "duplicate-field", Raw("""{"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}""", 1), "w", "'dtype' appears more than once" },

        // Values.
        { "unknown-dtype", Raw(Entry("w", "Q4", "[4]", "[0,4]"), 4), "w", "unknown dtype 'Q4' (known: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)" },
        { "unsupported-dtype", Raw(Entry("w", "U16", "[2]", "[0,4]"), 4), "w", "dtype 'U16' is valid safetensors but LoRAHub does not support it" },
        { "lowercase-dtype", Raw(Entry("w", "f32", "[1]", "[0,4]"), 4), "w", "unknown dtype 'f32'" },
        { "negative-dim", Raw(Entry("w", "F32", "[-1]", "[0,4]"), 4), "w", "invalid dimension -1" },
        { "count-overflow", Raw(Entry("w", "U8", "[4294967296,4294967296]", "[0,8]"), 8), "w", "element count of shape [4294967296,4294967296] overflows" },
        { "bytes-overflow", Raw(Entry("w", "F64", "[4611686018427387904]", "[0,8]"), 8), "w", "byte size of shape" },
        { "negative-offset", Raw(Entry("w", "U8", "[1]", "[-1,0]"), 1), "w", "invalid data_offsets [-1,0]" },
        { "begin-after-end", Raw(Entry("w", "U8", "[4]", "[4,0]"), 4), "w", "begin is after end" },
        { "size-mismatch", Raw(Entry("w", "F32", "[3]", "[0,16]"), 16), "w", "needs 12 bytes, but data_offsets [0, 16] hold 16" },
        { "truncated-data", Raw(Entry("w", "F32", "[4]", "[0,16]"), 8), "w", "the file is truncated: data_offsets end at byte 16" },
        { "offset-beyond-long", Raw(Entry("w", "U8", "[1]", "[0,99999999999999999999]"), 1), "w", "invalid data_offsets" },

        // Layout of the data section.
        { "overlap", Raw("""{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}""", 6), "w", "the byte range 2..6 overlaps tensor 'a' (bytes 0..4)" },
        { "same-range", Raw("""{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", 4), "w", "overlap" },
        { "empty-inside-other", Raw("""{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}""", 4), "w", "overlap" },
        { "hole-at-start", Raw(Entry("w", "U8", "[2]", "[2,4]"), 4), "w", "hole of 2 bytes" },
        { "hole-between", Raw("""{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"w":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}""", 5), "w", "hole of 1 byte (data bytes 2..3) before this tensor, after tensor 'a'" },
        { "trailing-bytes", Raw(Entry("w", "U8", "[2]", "[0,2]"), 5), null, "hole of 3 bytes at the end of the data section" },
        { "data-without-tensors", Raw("{}", 4), null, "hole of 4 bytes" },

        // Names and metadata.
        { "duplicate-name", Raw("""{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}""", 2), "w", "appears more than once" },
        { "duplicate-metadata", Raw("""{"__metadata__":{},"__metadata__":{}}"""), null, "'__metadata__' appears more than once" },
        { "metadata-array", Raw("""{"__metadata__":[]}"""), null, "'__metadata__' is a JSON array" },
        { "metadata-number", Raw("""{"__metadata__":{"epoch":3}}"""), null, "value 'epoch' is a JSON number" },
        { "metadata-duplicate-key", Raw("""{"__metadata__":{"k":"a","k":"b"}}"""), null, "has the key 'k' more than once" },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void Corrupt_files_are_rejected_with_a_precise_message(string name, byte[] bytes, string? tensor, string expected)
    {
        var path = temp[name + ".safetensors"];
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path));
        Assert.Contains(path, e.Message);
        Assert.Contains(expected, e.Message);
        Assert.Equal(path, e.FilePath);
        Assert.Equal(tensor, e.TensorName);
        if (tensor is not null) Assert.Contains($"tensor '{tensor}'", e.Message);
        Assert.Contains("re-", e.Message); // every message says what to do
    }

    [Fact]
    public void A_missing_file_is_a_FileNotFoundException()
    {
        Assert.Throws<FileNotFoundException>(() => SafetensorsFile.Open(temp["absent.safetensors"]));
    }

    /// <summary>
    /// Random damage to a valid file (flipped bytes, truncation, appended bytes) must end in a successful open or a
    /// SafetensorsFormatException, never another exception type or an out-of-bounds read.
    /// </summary>
    [Fact]
    public void Random_damage_never_escapes_as_another_exception()
    {
        var original = temp["valid.safetensors"];
        SafetensorsWriter.Write(original,
        [
            SafetensorsEntry.FromBytes("a", SafetensorsDType.F32, [2, 2], new byte[16]),
            SafetensorsEntry.FromBytes("b", SafetensorsDType.I64, [], new byte[8]),
            SafetensorsEntry.FromBytes("c", SafetensorsDType.U8, [0], []),
        ], new Dictionary<string, string> { ["k"] = "v" });
        var good = File.ReadAllBytes(original);
        var random = new Random(1234);
        var path = temp["damaged.safetensors"];
        var opened = 0;
        for (var round = 0; round < 400; round++)
        {
            var bytes = (byte[])good.Clone();
            switch (round % 4)
            {
                case 0: bytes[random.Next(bytes.Length)] = (byte)random.Next(256); break;
                case 1: bytes[random.Next(8, bytes.Length - 24)] = (byte)"0123456789[]{},:\" -e.".ElementAt(random.Next(21)); break;
                case 2: bytes = bytes[..random.Next(bytes.Length)]; break;
                default: bytes = [.. bytes, .. new byte[random.Next(1, 9)]]; break;
            }
            File.WriteAllBytes(path, bytes);
            try
            {
                using var file = SafetensorsFile.Open(path);
                opened++;
                long total = 0;
                foreach (var tensor in file.Tensors) total += file.ReadBytes(tensor.Name).Length;
                Assert.Equal(bytes.Length - file.DataStart, total);
            }
            catch (SafetensorsFormatException e)
            {
                Assert.Contains(path, e.Message);
            }
        }
        Assert.InRange(opened, 1, 399); // some damage is harmless (inside data), most is not
    }

    [Fact]
    public void A_corrupt_header_is_named_even_when_huge_values_are_involved()
    {
        var header = Encoding.ASCII.GetBytes("{\"w\":{\"dtype\":\"U8\",\"shape\":[" + string.Join(",", Enumerable.Repeat("1", 5000)) + ",-1],\"data_offsets\":[0,0]}}");
        var path = temp["long.safetensors"];
        File.WriteAllBytes(path, RawFile.Build(header));
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path));
        Assert.Contains("invalid dimension -1", e.Message);
        Assert.True(e.Message.Length < 1000, "the message quotes a shortened shape");
    }
}
