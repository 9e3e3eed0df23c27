using System.Text;

namespace LoRAHub.Safetensors.Tests;

/// <summary>
/// PyTorch pickle checkpoints are refused by name and never read (unpickling can run code); a safetensors file whose
/// length bytes happen to look like a pickle's start still loads.
/// </summary>
public sealed class PickleRefusalTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    public static TheoryData<string, byte[]> Pickles => new()
    {
        { "torch.save zip", [(byte)'P', (byte)'K', 3, 4, .. new byte[100]] },
        { "protocol 2", [0x80, 0x02, (byte)'}', (byte)'q', 0, (byte)'(', .. new byte[50]] },
        { "protocol 4", [0x80, 0x04, 0x95, 0x35, 0, 0, 0, 0, 0, 0, 0, (byte)'}', .. new byte[60]] },
        { "protocol 5", [0x80, 0x05, 0x95, 0x10, 0, 0, 0, 0, 0, 0, 0, (byte)']', .. new byte[20]] },
    };

    [Theory]
    [MemberData(nameof(Pickles))]
    public void A_pickle_file_is_refused_with_the_way_to_safetensors(string label, byte[] bytes)
    {
        var path = temp[$"{label.Replace(' ', '_')}.bin"];
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<SafetensorsFormatException>(() => SafetensorsFile.Open(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("pickle", e.Message);
        Assert.Contains("safetensors.torch.save_file", e.Message);
        Assert.Equal(bytes, File.ReadAllBytes(path));
    }

    [Fact]
    public void A_folder_with_only_pickle_weights_is_refused_by_name()
    {
        var folder = temp["model"];
        Directory.CreateDirectory(folder);
        File.WriteAllBytes(Path.Combine(folder, "pytorch_model.bin"), [(byte)'P', (byte)'K', 3, 4]);
        File.WriteAllText(Path.Combine(folder, "config.json"), "{}");
        var e = Assert.Throws<SafetensorsFormatException>(() => ShardedSafetensors.Open(folder));
        Assert.Contains("pytorch_model.bin", e.Message);
        Assert.Contains("never pickle", e.Message);
    }

    [Theory]
    [InlineData(0x280)] // 80 02 00 ... : "pickle protocol 2" if read naively
    [InlineData(0x480)] // 80 04 00 ... : "pickle protocol 4"
    [InlineData(0x580)]
    public void A_safetensors_file_whose_header_length_looks_like_a_pickle_still_loads(int headerLength)
    {
        var header = """{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}""";
        // The spec allows trailing spaces in the header, which is how writers pad it to a multiple of 8.
        var padded = Encoding.UTF8.GetBytes(header.PadRight(headerLength));
        var path = temp["odd-length.safetensors"];
        File.WriteAllBytes(path, RawFile.Build(padded, [7, 9]));
        Assert.Equal(0x80, File.ReadAllBytes(path)[0]);
        using var file = SafetensorsFile.Open(path);
        Assert.Equal(new byte[] { 7, 9 }, file.ReadBytes("w"));
    }
}
