using System.Text;
using System.Text.Json;
using LoRAHub.Models.Llama;
using LoRAHub.Safetensors;
using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Quantization;

namespace LoRAHub.Models.Tests;

/// <summary>Quantize-while-loading and bitsandbytes' serialized 4-bit layout, on CPU.</summary>
public sealed class FourBitLoadingTests
{
    private static LlamaConfig Config() => new()
    {
        VocabSize = 64, HiddenSize = 64, IntermediateSize = 128, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        MaxPositionEmbeddings = 64, RmsNormEps = 1e-6, AttentionBias = true,
    };

    private static readonly BitsAndBytesConfig Fp32Nf4 = new() { Bnb4bitComputeDtype = ScalarType.Float32 };

    private static readonly long[,] Ids = { { 1, 5, 9, 13, 2, 40, 7, 3 }, { 4, 4, 8, 60, 33, 12, 6, 1 } };

    // A dense fp32 folder of a random model (norms perturbed so that they matter).
    private static string DenseFolder(LlamaConfig config, long seed = 0)
    {
        var folder = TinyModels.TempFolder();
        using var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, torch.CPU, seed);
        using (torch.no_grad())
            foreach (var (name, p) in model.named_parameters().Where(p => p.name.EndsWith("norm.weight") || p.name.EndsWith(".bias")))
                p.normal_(1, 0.1);
        PretrainedModel.Save(model, folder);
        return folder;
    }

    // The reference: load dense, then quantize each Linear but the head as QLoRA's quantizer does.
    private static LlamaForCausalLM QuantizedAfterLoading(string folder, string quantType, bool doubleQuant)
    {
        var model = PretrainedModel.LoadLlama(folder);
        foreach (var (path, module) in model.named_modules().Where(m => m.module is TorchSharp.Modules.Linear && m.name != "lm_head").ToList())
        {
            var q = Linear4bit.FromLinear((ILinearLayer)LinearLayer.From(module)!, torch.CPU, quantType, 64, doubleQuant, ScalarType.Float32);
            model.replace_submodule(path, q);
            module.Dispose();
        }
        return model;
    }

    // These models live on the CPU whatever LORAHUB_TEST_DEVICE says (the CPU is where host memory is counted).
    private static Tensor Logits(ICausalLanguageModel m) => m.Forward(torch.tensor(Ids));

    [Fact]
    public void Quantizing_while_loading_equals_quantizing_after_loading_and_holds_one_tensor_at_a_time()
    {
        var folder = DenseFolder(Config());
        try
        {
            using var scope = torch.NewDisposeScope();
            FourBitLoadReport? report = null;
            using var streamed = PretrainedModel.LoadIn4bit(folder, Fp32Nf4, ScalarType.Float32, torch.CPU, r => report = r);
            using var reference = QuantizedAfterLoading(folder, "nf4", true);
            Assert.Equal(0f, TinyModels.MaxAbsDiff(Logits(streamed), Logits(reference)));
            Assert.Equal(14, report!.QuantizedLayers); // 7 Linears a layer, the head stays dense
            Assert.IsType<Linear4bit>(streamed.Root.get_submodule("model.layers.1.mlp.down_proj"));
            Assert.IsType<TorchSharp.Modules.Linear>(streamed.Root.get_submodule("lm_head"));
            // The largest checkpoint tensor (embeddings or head: 64×64 fp32 = 16 KiB, as the 128×64 MLP weights are 32 KiB)
            // is all that was ever staged at once: never the model.
            using var file = ShardedSafetensors.Open(folder);
            var largest = file.Names.Max(n => file.Info(n).ByteLength);
            Assert.Equal(largest, report.PeakStagedHostBytes);
            Assert.True(report.PeakStagedHostBytes * 10 < report.CheckpointBytes, $"{report.PeakStagedHostBytes} staged of {report.CheckpointBytes}");
            Assert.All(streamed.Root.parameters(), p => Assert.Equal(DeviceType.CPU, p.device_type));
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }

    [Fact]
    public void Sharded_checkpoints_are_read_shard_by_shard()
    {
        var single = DenseFolder(Config(), seed: 4);
        var sharded = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            using (var dense = PretrainedModel.LoadLlama(single)) PretrainedModel.Save(dense, sharded, maxShardBytes: 40_000);
            Assert.True(Directory.GetFiles(sharded, "model-*.safetensors").Length > 3, "the checkpoint should be sharded");
            using var a = PretrainedModel.LoadIn4bit(single, Fp32Nf4, ScalarType.Float32, torch.CPU);
            using var b = PretrainedModel.LoadIn4bit(sharded, Fp32Nf4, ScalarType.Float32, torch.CPU);
            Assert.Equal(0f, TinyModels.MaxAbsDiff(Logits(a), Logits(b)));
        }
        finally
        {
            Directory.Delete(single, true);
            Directory.Delete(sharded, true);
        }
    }

    [Theory]
    [InlineData("nf4", true)]
    [InlineData("fp4", false)]
    public void A_saved_bitsandbytes_folder_loads_back_to_the_same_logits(string quantType, bool doubleQuant)
    {
        var dense = DenseFolder(Config(), seed: 2);
        var saved = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            var bnb = Fp32Nf4 with { Bnb4bitQuantType = quantType, Bnb4bitUseDoubleQuant = doubleQuant };
            using var model = PretrainedModel.LoadIn4bit(dense, bnb, ScalarType.Float32, torch.CPU);
            // Save on a model with 4-bit layers writes the same layout as SaveIn4bit (each case takes one of the two).
            if (quantType == "fp4") PretrainedModel.Save(model, saved);
            else PretrainedModel.SaveIn4bit(model, saved);

            // The layout bitsandbytes writes (Params4bit + QuantState.as_dict(packed=True)).
            using (var file = ShardedSafetensors.Open(saved))
            {
                const string q = "model.layers.0.self_attn.q_proj.weight";
                Assert.Equal([64L * 64 / 2, 1], file.Info(q).Shape);
                Assert.Equal(SafetensorsDType.U8, file.Info(q).DType);
                Assert.Equal(doubleQuant ? SafetensorsDType.U8 : SafetensorsDType.F32, file.Info(q + ".absmax").DType);
                Assert.Equal([64L * 64 / 64], file.Info(q + ".absmax").Shape);
                Assert.Equal([16L], file.Info(q + ".quant_map").Shape);
                Assert.Equal(doubleQuant, file.Contains(q + ".nested_absmax"));
                Assert.Equal(doubleQuant, file.Contains(q + ".nested_quant_map"));
                Assert.True(file.Contains("model.layers.0.self_attn.q_proj.bias"));
                Assert.False(file.Contains("model.layers.0.self_attn.q_proj.absmax"));
                Assert.Equal(SafetensorsDType.F32, file.Info("lm_head.weight").DType);
                var state = JsonDocument.Parse(Encoding.UTF8.GetString(file.ReadBytes(q + ".quant_state.bitsandbytes__" + quantType))).RootElement;
                string[] keys = doubleQuant
                    ? ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]
                    : ["quant_type", "blocksize", "dtype", "shape"];
                Assert.Equal(keys, state.EnumerateObject().Select(p => p.Name));
                Assert.Equal(quantType, state.GetProperty("quant_type").GetString());
                Assert.Equal("float32", state.GetProperty("dtype").GetString());
                Assert.Equal([64, 64], state.GetProperty("shape").EnumerateArray().Select(x => x.GetInt32()));
                // FP4 is stored in bitsandbytes' code order (its kernels decode by index), not sorted.
                var map = file.ReadBytes(q + ".quant_map");
                var values = Enumerable.Range(0, 16).Select(i => BitConverter.ToSingle(map, 4 * i)).ToArray();
                Assert.Equal(FourBit.CodeValues(quantType), values);
            }
            var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(saved, "config.json"))).RootElement.GetProperty("quantization_config");
            Assert.True(config.GetProperty("load_in_4bit").GetBoolean());
            Assert.Equal(quantType, config.GetProperty("bnb_4bit_quant_type").GetString());
            Assert.Equal(doubleQuant, config.GetProperty("bnb_4bit_use_double_quant").GetBoolean());

            using var loaded = PretrainedModel.Load(saved, ScalarType.Float32);
            Assert.IsType<Linear4bit>(loaded.Root.get_submodule("model.layers.0.mlp.up_proj"));
            Assert.Equal(0f, TinyModels.MaxAbsDiff(Logits(loaded), Logits(model)));
        }
        finally
        {
            Directory.Delete(dense, true);
            Directory.Delete(saved, true);
        }
    }

    /// <summary>
    /// A folder written here straight from bitsandbytes' format definition, without our writer: FP4 codes in bitsandbytes'
    /// index order (sign bit 8, magnitudes 0..7 as its e2m1 table), first value in the high nibble, ceil(n/2) bytes of shape
    /// (n/2, 1), fp32 absmax per 64, the quant_state JSON as json.dumps writes it. It loads with the logits of our own FP4
    /// quantization of the same weights.
    /// </summary>
    [Fact]
    public void A_folder_written_from_the_format_definition_loads_with_our_quantizations_logits()
    {
        var dense = DenseFolder(Config(), seed: 3);
        var bnbFolder = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            using var source = PretrainedModel.LoadLlama(dense);
            float[] fp4 = [0f, 0.0625f / 12, 8f / 12, 1f, 4f / 12, 6f / 12, 2f / 12, 3f / 12, -0f, -0.0625f / 12, -8f / 12, -1f, -4f / 12, -6f / 12, -2f / 12, -3f / 12];
            var entries = new List<SafetensorsEntry>();
            SafetensorsEntry Raw(string key, SafetensorsDType type, long[] shape, byte[] data) =>
                new(key, type, shape, data.Length, s => s.Write(data));
            foreach (var (key, t) in source.state_dict())
            {
                var module = key[..key.LastIndexOf('.')];
                if (!key.EndsWith(".weight") || source.get_submodule(module) is not TorchSharp.Modules.Linear || module == "lm_head")
                {
                    entries.Add(Raw(key, SafetensorsDType.F32, t.shape, t.contiguous().bytes.ToArray()));
                    continue;
                }
                var w = t.contiguous().data<float>().ToArray();
                var blocks = w.Length / 64;
                var absmax = new float[blocks];
                var packed = new byte[w.Length / 2];
                for (var b = 0; b < blocks; b++)
                {
                    absmax[b] = Enumerable.Range(b * 64, 64).Max(i => Math.Abs(w[i]));
                    for (var i = b * 64; i < b * 64 + 64; i++)
                    {
                        var x = w[i] / absmax[b];
                        var code = (byte)Enumerable.Range(0, 16).OrderBy(j => Math.Abs(fp4[j] - x)).First();
                        packed[i / 2] |= (byte)(i % 2 == 0 ? code << 4 : code);
                    }
                }
                entries.Add(Raw(key, SafetensorsDType.U8, [packed.Length, 1], packed));
                entries.Add(Raw(key + ".absmax", SafetensorsDType.F32, [blocks], absmax.SelectMany(BitConverter.GetBytes).ToArray()));
                entries.Add(Raw(key + ".quant_map", SafetensorsDType.F32, [16], fp4.SelectMany(BitConverter.GetBytes).ToArray()));
                var json = $"{{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [{t.size(0)}, {t.size(1)}]}}";
                entries.Add(Raw(key + ".quant_state.bitsandbytes__fp4", SafetensorsDType.U8, [json.Length], Encoding.UTF8.GetBytes(json)));
            }
            SafetensorsWriter.Write(Path.Combine(bnbFolder, "model.safetensors"), entries, new Dictionary<string, string> { ["format"] = "pt" });
            var config = System.Text.Json.Nodes.JsonNode.Parse(source.ConfigJson())!.AsObject();
            config["quantization_config"] = System.Text.Json.Nodes.JsonNode.Parse("""
                {"quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false, "bnb_4bit_quant_type": "fp4",
                 "bnb_4bit_use_double_quant": false, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                 "llm_int8_skip_modules": null}
                """);
            File.WriteAllText(Path.Combine(bnbFolder, "config.json"), config.ToJsonString());

            using var loaded = PretrainedModel.Load(bnbFolder, ScalarType.Float32);
            using var ours = QuantizedAfterLoading(dense, "fp4", false);
            var diff = TinyModels.MaxAbsDiff(Logits(loaded), Logits(ours));
            Assert.True(diff < 1e-5f, $"logits differ by {diff}");
            // And the dequantized weights agree value for value (the same nearest codes).
            var fromFile = ((Linear4bit)loaded.Root.get_submodule("model.layers.1.self_attn.o_proj")!).dense_weight(ScalarType.Float32);
            var fromOurs = ((Linear4bit)ours.get_submodule("model.layers.1.self_attn.o_proj")!).dense_weight(ScalarType.Float32);
            Assert.True(TinyModels.MaxAbsDiff(fromFile, fromOurs) < 1e-7f);
        }
        finally
        {
            Directory.Delete(dense, true);
            Directory.Delete(bnbFolder, true);
        }
    }

    [Fact]
    public void Quantization_configs_we_cannot_load_are_refused_naming_them()
    {
        var e = Assert.Throws<NotSupportedException>(() => BitsAndBytesConfig.FromConfigJson(
            """{"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": true}}""", "config.json"));
        Assert.Contains("load_in_8bit true", e.Message);
        Assert.Throws<NotSupportedException>(() => BitsAndBytesConfig.FromConfigJson("""{"quantization_config": {"quant_method": "gptq", "bits": 4}}""", "c"));
        Assert.Null(BitsAndBytesConfig.FromConfigJson("""{"model_type": "llama"}""", "c"));
    }

    [Fact]
    public void Mixtral_and_gemma_load_4bit_with_their_dense_norms_and_router()
    {
        foreach (var type in new[] { "mixtral", "gemma2" })
        {
            var config = Config();
            config.ModelType = type;
            config.AttentionBias = false;
            if (type == "mixtral") config.NumLocalExperts = 4;
            else config.TieWordEmbeddings = true;
            var folder = DenseFolder(config, seed: 5);
            try
            {
                using var scope = torch.NewDisposeScope();
                using var streamed = PretrainedModel.LoadIn4bit(folder, Fp32Nf4, ScalarType.Float32, torch.CPU);
                using var reference = QuantizedAfterLoading(folder, "nf4", true);
                Assert.Equal(0f, TinyModels.MaxAbsDiff(Logits(streamed), Logits(reference)));
            }
            finally
            {
                Directory.Delete(folder, true);
            }
        }
    }
}
