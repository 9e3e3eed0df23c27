using System.Buffers.Binary;
using System.Text;
using LoRAHub.Safetensors;

namespace LoRAHub.Reliability.Tests.Corpus;

/// <summary>safetensors files: truncated, lying header lengths and offsets, overlaps, huge sizes, bad dtypes and shapes, bad JSON, pickles.</summary>
public static class SafetensorsCases
{
    private const string File = "weights.safetensors";

    // Three tensors tiling 48 data bytes: a F32 [2,3] (24), b BF16 [4] (8), c I64 [2] (16).
    private static readonly string[] Names = ["a", "b", "c"];
    private static readonly string[] DTypes = ["F32", "BF16", "I64"];
    private static readonly string[] Shapes = ["[2,3]", "[4]", "[2]"];
    private static readonly (long Begin, long End)[] Offsets = [(0, 24), (24, 32), (32, 48)];
    private const int DataBytes = 48;

    private static string Entry(int i, string? dtype = null, string? shape = null, string? offsets = null) =>
        $"\"{Names[i]}\":{{\"dtype\":{dtype ?? $"\"{DTypes[i]}\""},\"shape\":{shape ?? Shapes[i]},\"data_offsets\":{offsets ?? $"[{Offsets[i].Begin},{Offsets[i].End}]"}}}";

    private static string Header(Func<int, string>? entry = null, string metadata = "\"__metadata__\":{\"format\":\"pt\"},") =>
        "{" + metadata + string.Join(",", Enumerable.Range(0, 3).Select(i => entry?.Invoke(i) ?? Entry(i))) + "}";

    public static byte[] Valid() => Build(Header(), Data());

    private static byte[] Data() => Enumerable.Range(0, DataBytes).Select(i => (byte)(i * 7)).ToArray();

    private static byte[] Build(string header, byte[] data, ulong? declaredLength = null) => Build(Encoding.UTF8.GetBytes(header), data, declaredLength);

    private static byte[] Build(byte[] header, byte[] data, ulong? declaredLength = null)
    {
        var file = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(file, declaredLength ?? (ulong)header.Length);
        header.CopyTo(file, 8);
        data.CopyTo(file, 8 + header.Length);
        return file;
    }

    private static BadInput Case(string name, Func<byte[]> bytes, bool mayLoad = false, string file = File) =>
        new("safetensors", name, "H6", folder =>
        {
            var path = Path.Combine(folder, file);
            System.IO.File.WriteAllBytes(path, bytes());
            return path;
        }, folder => Load(Path.Combine(folder, file)), mayLoad);

    /// <summary>Reads every tensor, as model and adapter loading do.</summary>
    private static void Load(string path)
    {
        foreach (var t in torchx.load_safetensors(path).Values) t.Dispose();
    }

    public static IEnumerable<BadInput> All()
    {
        var valid = Valid();
        var headerLength = (int)BinaryPrimitives.ReadUInt64LittleEndian(valid);

        // Truncated anywhere: in the length field, the header, the data.
        foreach (var cut in new[] { 0, 1, 4, 7, 8, 9, 8 + headerLength / 2, 8 + headerLength - 1, 8 + headerLength, 8 + headerLength + 1, 8 + headerLength + 24, valid.Length - 1 }.Distinct())
            yield return Case($"truncated at byte {cut}", () => valid[..cut]);
        // Trailing bytes after the last tensor.
        yield return Case("one trailing byte", () => [.. valid, 0]);
        yield return Case("a trailing kilobyte", () => [.. valid, .. new byte[1024]]);

        // The header length field lies.
        foreach (var declared in new ulong[] { 0, 1, 2, (ulong)headerLength - 1, (ulong)headerLength + 1, (ulong)valid.Length, (ulong)valid.Length - 7,
                     100_000_001, 1UL << 32, 1UL << 40, 1UL << 63, ulong.MaxValue })
            yield return Case($"header length says {declared}", () => Build(Header(), Data(), declared));

        // Lying data_offsets, per tensor.
        for (var i = 0; i < 3; i++)
        {
            var (b, e) = Offsets[i];
            var k = i;
            foreach (var (label, offsets) in new[]
            {
                ("begin after end", $"[{e},{b}]"), ("end past the data", $"[{b},{DataBytes + 8}]"), ("huge end", $"[{b},{1L << 62}]"),
                ("end at long.MaxValue", $"[{b},{long.MaxValue}]"), ("beyond 64 bits", $"[{b},18446744073709551616]"), ("negative begin", $"[-8,{e}]"),
                ("fractional", $"[{b}.5,{e}]"), ("exponent", $"[{b},{e}e0]"), ("strings", $"[\"{b}\",\"{e}\"]"), ("three numbers", $"[{b},{e},{e}]"),
                ("one number", $"[{b}]"), ("empty", "[]"), ("an object", "{\"begin\":0}"), ("null", "null"), ("shifted by one", $"[{b + 1},{e + 1}]"),
            })
                yield return Case($"tensor {Names[k]}: data_offsets {label}", () => Build(Header(j => j == k ? Entry(j, offsets: offsets) : Entry(j)), Data()));
        }
        // Ranges that overlap or leave holes.
        yield return Case("a and b share bytes", () => Build(Header(j => j == 1 ? Entry(j, offsets: "[16,24]") : Entry(j)), Data()));
        yield return Case("b and c both at 24..32", () => Build(Header(j => j == 2 ? Entry(j, dtype: "\"BF16\"", shape: "[4]", offsets: "[24,32]") : Entry(j)), Data()[..32]));
        yield return Case("all three at 0", () => Build(Header(j => Entry(j, dtype: "\"U8\"", shape: "[8]", offsets: "[0,8]")), Data()[..8]));
        yield return Case("hole between a and b", () => Build(Header(j => j == 0 ? Entry(j, shape: "[2,2]", offsets: "[0,16]") : Entry(j)), Data()));
        yield return Case("hole at the start", () => Build(Header(j => j == 0 ? Entry(j, shape: "[2,2]", offsets: "[8,24]") : Entry(j)), Data()));

        // Shapes that do not fit their bytes, or are not shapes.
        for (var i = 0; i < 3; i++)
        {
            var k = i;
            foreach (var (label, shape) in new[]
            {
                ("negative dimension", "[-1,4]"), ("too many elements", "[1000000]"), ("too few elements", "[1]"), ("overflowing product", "[4294967296,4294967296,16]"),
                ("huge with a zero", "[9223372036854775807,0]"), ("a string", "\"2x3\""), ("nested", "[[2],[3]]"), ("fractional", "[2.5]"), ("null", "null"),
                ("dimension beyond 64 bits", "[18446744073709551617]"),
            })
                yield return Case($"tensor {Names[k]}: shape {label}", () => Build(Header(j => j == k ? Entry(j, shape: shape) : Entry(j)), Data()));
        }
        // Unknown or malformed dtypes.
        foreach (var dtype in new[] { "\"F128\"", "\"Q4_0\"", "\"f32\"", "\"\"", "\"FLOAT\"", "5", "null", "[\"F32\"]", "\"F32 \"" })
            yield return Case($"dtype {dtype}", () => Build(Header(j => j == 0 ? Entry(j, dtype: dtype) : Entry(j)), Data()));
        // Known to safetensors but not loadable as a torch tensor here (if so, an error naming the tensor).
        foreach (var dtype in new[] { "\"F8_E4M3\"", "\"F8_E5M2\"", "\"U16\"", "\"U32\"", "\"U64\"", "\"BOOL\"", "\"F4\"", "\"F6_E2M3\"", "\"E8M0\"" })
            yield return Case($"dtype {dtype} (exotic)", () => Build(Header(j => j == 1 ? Entry(j, dtype: dtype, shape: dtype switch
            {
                "\"U16\"" => "[4]", "\"U32\"" => "[2]", "\"U64\"" => "[1]", "\"F4\"" => "[16]", "\"F6_E2M3\"" => "[8]", _ => "[8]",
            }) : Entry(j)), Data()), mayLoad: true);

        // Headers that are not the JSON they should be.
        foreach (var (label, header) in new[]
        {
            ("not JSON", "hello world"), ("unterminated", "{\"a\":{\"dtype\":\"F32\""), ("an array", "[1,2,3]"), ("a string", "\"{}\""),
            ("trailing garbage", Header() + "xyz"), ("duplicate tensor", "{" + Entry(0) + "," + Entry(0) + "," + Entry(1) + "," + Entry(2) + "}"),
            ("duplicate field", "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[0,24]}," + Entry(1) + "," + Entry(2) + "}"),
            ("tensor is a number", "{\"a\":5," + Entry(1) + "," + Entry(2) + "}"), ("missing dtype", "{\"a\":{\"shape\":[2,3],\"data_offsets\":[0,24]}," + Entry(1) + "," + Entry(2) + "}"),
            ("missing shape", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,24]}," + Entry(1) + "," + Entry(2) + "}"),
            ("missing offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3]}," + Entry(1) + "," + Entry(2) + "}"),
            ("metadata not an object", Header(metadata: "\"__metadata__\":[1],")), ("metadata value a number", Header(metadata: "\"__metadata__\":{\"format\":5},")),
            ("metadata nested", Header(metadata: "\"__metadata__\":{\"x\":{\"y\":\"z\"}},")), ("deep nesting", new string('[', 5000) + new string(']', 5000)),
            ("comments", "{/* c */" + Header()[1..]), ("empty object with data", "{}"),
        })
            yield return Case($"header {label}", () => Build(header, Data()));
        yield return Case("header invalid UTF-8", () => Build([(byte)'{', (byte)'"', 0xC3, 0x28, (byte)'"', (byte)':', (byte)'1', (byte)'}'], []));
        yield return Case("header with a byte-order mark", () => Build([0xEF, 0xBB, 0xBF, .. Encoding.UTF8.GetBytes(Header())], Data()));
        yield return Case("header NUL bytes", () => Build(new byte[64], Data()));
        yield return Case("header all spaces", () => Build(Encoding.UTF8.GetBytes(new string(' ', 64)), Data()));

        // Other formats under the name: pickles must be refused as such (never unpickled), and non-files.
        yield return Case("torch.save zip archive", () => [(byte)'P', (byte)'K', 3, 4, .. new byte[200]]);
        yield return Case("bare pickle protocol 2", () => [0x80, 0x02, (byte)'}', (byte)'q', 0, .. new byte[100]]);
        yield return Case("bare pickle protocol 4", () => [0x80, 0x04, 0x95, 0x10, 0, 0, 0, 0, 0, 0, 0, (byte)'}', .. new byte[100]]);
        yield return Case("HTML error page", () => Encoding.UTF8.GetBytes("<!DOCTYPE html><html><body>404 Not Found</body></html>"));
        yield return Case("git-lfs pointer", () => Encoding.UTF8.GetBytes("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n"));
        yield return Case("empty file", () => []);

        // Seeded byte flips in the length field and the header: each must load or fail clearly.
        var random = new Random(21);
        for (var n = 0; n < 40; n++)
        {
            var at = random.Next(0, 8 + headerLength);
            var value = (byte)random.Next(256);
            yield return Case($"byte {at} of header set to 0x{value:X2}", () =>
            {
                var copy = (byte[])valid.Clone();
                copy[at] = value;
                return copy;
            }, mayLoad: true);
        }
        // Flips in tensor data are not detectable (no checksum in the format): they must load.
        yield return Case("flipped data byte", () =>
        {
            var copy = (byte[])valid.Clone();
            copy[^3] ^= 0xFF;
            return copy;
        }, mayLoad: true);
    }
}
