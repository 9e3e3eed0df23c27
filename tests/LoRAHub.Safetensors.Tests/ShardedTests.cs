using System.Text.Json;

namespace LoRAHub.Safetensors.Tests;

public sealed class ShardedTests : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    /// <summary>Five U8 tensors of 100 bytes, tensor i filled with byte i.</summary>
    private static IEnumerable<SafetensorsEntry> Layers(int count = 5) => Enumerable.Range(0, count)
        .Select(i => SafetensorsEntry.FromBytes($"layer.{i}", SafetensorsDType.U8, [100], Enumerable.Repeat((byte)i, 100).ToArray()));

    private string WriteThreeShards()
    {
        var folder = temp["ckpt"];
        SafetensorsWriter.WriteSharded(folder, Layers(), maxShardBytes: 250); // 200 + 200 + 100
        return folder;
    }

    [Fact]
    public void Shards_and_index_are_named_and_filled_like_transformers()
    {
        var folder = WriteThreeShards();
        Assert.Equal(
            ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json"],
            Directory.GetFiles(folder).Select(Path.GetFileName).Order(StringComparer.Ordinal));

        using var index = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, ShardedSafetensors.IndexFileName)));
        Assert.Equal(500, index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64());
        var weightMap = index.RootElement.GetProperty("weight_map").EnumerateObject().Select(p => (p.Name, p.Value.GetString())).ToList();
        Assert.Equal(
        [
            ("layer.0", "model-00001-of-00003.safetensors"), ("layer.1", "model-00001-of-00003.safetensors"),
            ("layer.2", "model-00002-of-00003.safetensors"), ("layer.3", "model-00002-of-00003.safetensors"),
            ("layer.4", "model-00003-of-00003.safetensors"),
        ], weightMap);

        using var shard = SafetensorsFile.Open(Path.Combine(folder, "model-00002-of-00003.safetensors"));
        Assert.Equal(["layer.2", "layer.3"], shard.Tensors.Select(t => t.Name));
        Assert.Equal("pt", shard.Metadata["format"]);
    }

    [Fact]
    public void A_sharded_checkpoint_reads_back_through_one_api()
    {
        var folder = WriteThreeShards();
        using var checkpoint = ShardedSafetensors.Open(folder);
        Assert.Equal(Path.Combine(folder, ShardedSafetensors.IndexFileName), checkpoint.IndexPath);
        Assert.Equal(Enumerable.Range(0, 5).Select(i => $"layer.{i}"), checkpoint.Names);
        for (var i = 0; i < 5; i++)
        {
            var name = $"layer.{i}";
            Assert.True(checkpoint.Contains(name));
            Assert.Equal([100L], checkpoint.Info(name).Shape);
            Assert.Equal(Enumerable.Repeat((byte)i, 100), checkpoint.GetBytes(name).ToArray());
            Assert.Equal(Enumerable.Repeat((byte)i, 100), checkpoint.ReadBytes(name));
        }
        Assert.False(checkpoint.Contains("layer.5"));
        using (var viaIndex = ShardedSafetensors.Open(checkpoint.IndexPath!))
            Assert.Equal(4, viaIndex.GetBytes("layer.4")[0]);
        Assert.False(checkpoint.TryGetInfo("layer.5", out _));
        Assert.Contains("'layer.5'", Assert.Throws<KeyNotFoundException>(() => checkpoint.Info("layer.5")).Message);
    }

    [Fact]
    public void A_missing_shard_is_named_with_a_tensor_it_holds()
    {
        var folder = WriteThreeShards();
        File.Delete(Path.Combine(folder, "model-00002-of-00003.safetensors"));
        var e = Assert.Throws<SafetensorsFormatException>(() => ShardedSafetensors.Open(folder));
        Assert.Contains(ShardedSafetensors.IndexFileName, e.Message);
        Assert.Contains("model-00002-of-00003.safetensors", e.Message);
        Assert.Contains("'layer.2'", e.Message);
        Assert.Contains("re-download", e.Message);
    }

    [Fact]
    public void A_tensor_missing_from_its_shard_is_named_with_the_shard()
    {
        var folder = WriteThreeShards();
        SafetensorsWriter.Write(Path.Combine(folder, "model-00003-of-00003.safetensors"),
            [SafetensorsEntry.FromBytes("other", SafetensorsDType.U8, [1], [1])]);
        using var checkpoint = ShardedSafetensors.Open(folder);
        Assert.Equal(0, checkpoint.GetBytes("layer.0")[0]); // other shards still work
        var e = Assert.Throws<SafetensorsFormatException>(() => checkpoint.Info("layer.4"));
        Assert.Contains("'layer.4'", e.Message);
        Assert.Contains("model-00003-of-00003.safetensors", e.Message);
    }

    [Fact]
    public void A_corrupt_shard_is_reported_when_first_used()
    {
        var folder = WriteThreeShards();
        var shard = Path.Combine(folder, "model-00001-of-00003.safetensors");
        File.WriteAllBytes(shard, File.ReadAllBytes(shard)[..^10]);
        using var checkpoint = ShardedSafetensors.Open(folder);
        var e = Assert.Throws<SafetensorsFormatException>(() => checkpoint.GetBytes("layer.0"));
        Assert.Contains(shard, e.Message);
        Assert.Contains("truncated", e.Message);
    }

    [Fact]
    public void Everything_in_one_shard_becomes_model_safetensors_without_index()
    {
        var folder = temp["single"];
        SafetensorsWriter.WriteSharded(folder, Layers(), maxShardBytes: 10_000);
        Assert.Equal(["model.safetensors"], Directory.GetFiles(folder).Select(Path.GetFileName));
        using var checkpoint = ShardedSafetensors.Open(folder);
        Assert.Null(checkpoint.IndexPath);
        Assert.Equal(5, checkpoint.Names.Count);
        Assert.Equal(3, checkpoint.GetBytes("layer.3")[99]);
    }

    [Fact]
    public void An_oversized_tensor_gets_a_shard_of_its_own()
    {
        var folder = temp["big"];
        SafetensorsWriter.WriteSharded(folder,
        [
            SafetensorsEntry.FromBytes("small.0", SafetensorsDType.U8, [10], new byte[10]),
            SafetensorsEntry.FromBytes("big", SafetensorsDType.U8, [500], new byte[500]),
            SafetensorsEntry.FromBytes("small.1", SafetensorsDType.U8, [10], new byte[10]),
        ], maxShardBytes: 100);
        using var checkpoint = ShardedSafetensors.Open(folder);
        using var middle = SafetensorsFile.Open(Path.Combine(folder, "model-00002-of-00003.safetensors"));
        Assert.Equal(["big"], middle.Tensors.Select(t => t.Name));
        Assert.Equal(3, checkpoint.Names.Count);
    }

    [Fact]
    public void Saving_again_removes_files_of_the_previous_layout()
    {
        var folder = WriteThreeShards();
        SafetensorsWriter.WriteSharded(folder, Layers(4), maxShardBytes: 200); // now 2 shards
        Assert.Equal(
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
            Directory.GetFiles(folder).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        SafetensorsWriter.WriteSharded(folder, Layers(1), maxShardBytes: 200); // now a single file
        Assert.Equal(["model.safetensors"], Directory.GetFiles(folder).Select(Path.GetFileName));
        using var checkpoint = ShardedSafetensors.Open(folder);
        Assert.Equal(["layer.0"], checkpoint.Names);
    }

    [Fact]
    public void Duplicate_names_across_shards_are_rejected_before_writing()
    {
        var folder = temp["dup"];
        var entries = Layers(2).Concat(Layers(1));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.WriteSharded(folder, entries, maxShardBytes: 100));
        Assert.False(Directory.Exists(folder) && Directory.EnumerateFileSystemEntries(folder).Any());
    }

    [Fact]
    public void A_direct_file_path_such_as_an_adapter_opens()
    {
        var path = temp["adapter_model.safetensors"];
        SafetensorsWriter.Write(path, [SafetensorsEntry.FromBytes("lora_A", SafetensorsDType.F32, [1], BitConverter.GetBytes(0.5f))]);
        SafetensorsWriter.Write(temp["other.safetensors"], []); // a sibling must not confuse a direct path
        using var checkpoint = ShardedSafetensors.Open(path);
        Assert.Equal(["lora_A"], checkpoint.Names);
        Assert.Equal(0.5f, BitConverter.ToSingle(checkpoint.GetBytes("lora_A")));
    }

    [Fact]
    public void A_folder_with_exactly_one_safetensors_file_opens_it()
    {
        var folder = temp["adapter"];
        SafetensorsWriter.Write(Path.Combine(folder, "adapter_model.safetensors"), [SafetensorsEntry.FromBytes("x", SafetensorsDType.U8, [1], [4])]);
        File.WriteAllText(Path.Combine(folder, "adapter_config.json"), "{}");
        using var checkpoint = ShardedSafetensors.Open(folder);
        Assert.Equal([4], checkpoint.ReadBytes("x"));
    }

    [Fact]
    public void Ambiguous_and_empty_folders_are_errors()
    {
        var folder = temp["two"];
        SafetensorsWriter.Write(Path.Combine(folder, "a.safetensors"), []);
        SafetensorsWriter.Write(Path.Combine(folder, "b.safetensors"), []);
        var e = Assert.Throws<SafetensorsFormatException>(() => ShardedSafetensors.Open(folder));
        Assert.Contains("a.safetensors, b.safetensors", e.Message);

        Directory.CreateDirectory(temp["none"]);
        Assert.Throws<FileNotFoundException>(() => ShardedSafetensors.Open(temp["none"]));
        Assert.Throws<FileNotFoundException>(() => ShardedSafetensors.Open(temp["absent"]));
    }

    [Theory]
    [InlineData("not json", "not valid JSON")]
    [InlineData("[]", "no \"weight_map\" object")]
    [InlineData("""{"metadata":{}}""", "no \"weight_map\" object")]
    [InlineData("""{"weight_map":[]}""", "not an object")]
    [InlineData("""{"weight_map":{"w":3}}""", "tensor 'w'")]
    [InlineData("""{"weight_map":{"w":"../outside.safetensors"}}""", "not the name of a file in the checkpoint folder")]
    [InlineData("""{"weight_map":{"w":"/etc/passwd"}}""", "not the name of a file")]
    [InlineData("""{"weight_map":{"w":"a.safetensors","w":"b.safetensors"}}""", "more than once")]
    public void A_malformed_index_is_an_error_naming_it(string json, string expected)
    {
        var folder = temp["bad-index"];
        Directory.CreateDirectory(folder);
        var index = Path.Combine(folder, ShardedSafetensors.IndexFileName);
        File.WriteAllText(index, json);
        var e = Assert.Throws<SafetensorsFormatException>(() => ShardedSafetensors.Open(folder));
        Assert.Contains(index, e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Lookups_after_dispose_are_refused()
    {
        var folder = WriteThreeShards();
        var checkpoint = ShardedSafetensors.Open(folder);
        checkpoint.Dispose();
        Assert.Throws<ObjectDisposedException>(() => checkpoint.Info("layer.0"));
    }
}
