namespace LoRAHub.Safetensors.Tests;

public sealed class AtomicWriteTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private string WriteOriginal()
    {
        var path = temp["model.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("w", SafetensorsDType.F32, [2], [1, 2, 3, 4, 5, 6, 7, 8])],
            new Dictionary<string, string> { ["version"] = "1" });
        return path;
    }

    private void AssertUntouched(string path, byte[] before)
    {
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Equal([Path.GetFileName(path)], Directory.GetFiles(temp.Root).Select(Path.GetFileName));
    }

    [Fact]
    public void A_callback_that_throws_midway_leaves_the_previous_file_and_no_temp_file()
    {
        var path = WriteOriginal();
        var before = File.ReadAllBytes(path);
        var entries = new[]
        {
            SafetensorsEntry.FromBytes("first", SafetensorsDType.U8, [4], [9, 9, 9, 9]),
            new SafetensorsEntry("second", SafetensorsDType.U8, [1000], 1000, stream =>
            {
                stream.Write(new byte[500]);
                throw new IOException("disk full");
            }),
        };
        var e = Assert.Throws<IOException>(() => SafetensorsWriter.Write(path, entries));
        Assert.Equal("disk full", e.Message);
        AssertUntouched(path, before);
    }

    [Theory]
    [InlineData(3)]
    [InlineData(5)]
    public void A_callback_writing_the_wrong_byte_count_fails_and_changes_nothing(int count)
    {
        var path = WriteOriginal();
        var before = File.ReadAllBytes(path);
        var e = Assert.Throws<InvalidOperationException>(() => SafetensorsWriter.Write(path,
            [new SafetensorsEntry("w", SafetensorsDType.U8, [4], 4, stream => stream.Write(new byte[count]))]));
        Assert.Contains("'w'", e.Message);
        Assert.Contains("4", e.Message);
        AssertUntouched(path, before);
    }

    [Fact]
    public void A_callback_cannot_seek_back_over_the_header()
    {
        var path = WriteOriginal();
        var before = File.ReadAllBytes(path);
        Assert.Throws<NotSupportedException>(() => SafetensorsWriter.Write(path,
            [new SafetensorsEntry("w", SafetensorsDType.U8, [1], 1, stream => stream.Position = 0)]));
        AssertUntouched(path, before);
    }

    public static TheoryData<SafetensorsEntry[], string> InvalidEntries => new()
    {
        { [SafetensorsEntry.FromBytes("w", SafetensorsDType.F32, [3], new byte[8])], "needs 12 bytes" },
        { [SafetensorsEntry.FromBytes("w", SafetensorsDType.U8, [-1], [])], "negative" },
        { [SafetensorsEntry.FromBytes("w", SafetensorsDType.U8, [1], [1]), SafetensorsEntry.FromBytes("w", SafetensorsDType.U8, [1], [1])], "more than once" },
        { [SafetensorsEntry.FromBytes("__metadata__", SafetensorsDType.U8, [1], [1])], "reserved" },
        { [SafetensorsEntry.FromBytes("w", SafetensorsDType.F64, [1L << 32, 1L << 32], [])], "overflows" },
    };

    [Theory]
    [MemberData(nameof(InvalidEntries))]
    public void Invalid_entries_are_rejected_before_anything_is_written(SafetensorsEntry[] entries, string expected)
    {
        var path = WriteOriginal();
        var before = File.ReadAllBytes(path);
        var e = Assert.Throws<ArgumentException>(() => SafetensorsWriter.Write(path, entries));
        Assert.Contains(expected, e.Message);
        AssertUntouched(path, before);
    }

    [Fact]
    public void A_successful_write_replaces_the_file_and_creates_missing_folders()
    {
        var path = WriteOriginal();
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("v", SafetensorsDType.U8, [1], [3])]);
        using (var file = SafetensorsFile.Open(path))
            Assert.Equal(["v"], file.Tensors.Select(t => t.Name));

        var nested = Path.Combine(temp.Root, "a", "b", "x.safetensors");
        SafetensorsWriter.Write(nested, []);
        Assert.True(File.Exists(nested));
        Assert.Empty(Directory.GetFiles(temp.Root, "*.tmp-*", SearchOption.AllDirectories));
    }
}
