using LoRAHub.TorchExtensions.Modules;
using LoRAHub.TorchExtensions.Optim;
using Linear = TorchSharp.Modules.Linear;

namespace LoRAHub.QLoRA.Tests;

public class QLoraTests
{
    private static readonly Device Dev = TestDevice.Current;

    // fp32 compute on CPU keeps comparisons exact; bf16 (the paper's) on CUDA.
    private static readonly string Compute = TestDevice.IsCuda ? "bfloat16" : "float32";

    private static QLoraOptions Options(int r = 4, string type = "nf4", bool dq = true, LoraInit? init = null) => new()
    {
        R = r, LoraAlpha = 2 * r, Bnb4bitQuantType = type, Bnb4bitUseDoubleQuant = dq, Bnb4bitComputeDtype = Compute,
        Device = Dev.ToString(), InitLoraWeights = init ?? LoraInit.Default,
    };

    private static QLoraAdapter Attach(TinyModel model, QLoraOptions options) => (QLoraAdapter)new QLoraMethod().Attach(model, options);

    [Fact]
    public void Every_linear_but_the_head_is_quantized_and_adapted()
    {
        using var model = Tiny.Model();
        using var adapter = Attach(model, Options());
        Assert.Equal(6, adapter.QuantizedPaths.Count);
        Assert.IsType<Linear>(model.get_submodule("lm_head"));
        foreach (var path in adapter.QuantizedPaths)
        {
            var layer = Assert.IsType<LoraLinear>(model.get_submodule(path));
            var q = Assert.IsType<Linear4bit>(layer.base_layer);
            Assert.Equal(Dev.ToString(), q.weight_device.ToString());
            Assert.Equal(ScalarType.Float32, layer.A("default").dtype); // fp32 adapters on the 4-bit base
        }
        Assert.All(model.parameters(), p => Assert.Equal(Dev.ToString(), p.device.ToString())); // the rest of the model followed
        Assert.Equal(Dev.ToString(), model.Device.ToString());
        // Trainable: A and B of six layers; the base (4-bit buffers, embeddings, head) is frozen.
        var trainable = adapter.ParameterGroups(1e-3, 0).SelectMany(g => g.Parameters).ToList();
        Assert.Equal(12, trainable.Count);
        Assert.Contains("trainable params:", adapter.TrainableParametersReport());
        Assert.True(adapter.ModelParameterCount > 6 * Tiny.Hidden * Tiny.Hidden);
    }

    [Fact]
    public void Output_at_init_equals_the_dequantized_base()
    {
        var x = Tiny.Batch(device: Dev);
        using var model = Tiny.Model();
        using var adapter = Attach(model, Options());
        var output = model.Forward(x);

        // The same model with dense Linear layers holding the dequantized weights (in the compute dtype).
        using var reference = Tiny.Model(device: Dev);
        reference.load_state_dict(model.state_dict().Where(kv => !kv.Key.Contains("layers")).ToDictionary(), strict: false);
        foreach (var path in adapter.QuantizedPaths)
        {
            var q = (Linear4bit)((LoraLinear)model.get_submodule(path)!).base_layer;
            reference.replace_submodule(path, new DequantizedLinear(q.dense_weight(), q.compute_dtype));
        }
        var expected = reference.Forward(x);
        Assert.True(output.Equals(expected), $"max diff {(output - expected).abs().max().ToDouble()}");
        adapter.Enabled = false;
        Assert.True(model.Forward(x).Equals(expected));
    }

    [Fact]
    public void Training_lowers_the_loss_and_leaves_the_4bit_base_alone()
    {
        using var model = Tiny.Model();
        var x = Tiny.Batch(device: Dev);
        var y = Tiny.Batch(seed: 2, device: Dev);
        using var adapter = Attach(model, Options(r: 8));
        var buffers = model.named_buffers().Select(b => (b.name, copy: b.buffer.clone())).ToList();
        var groups = adapter.ParameterGroups(0.02, 0.0);
        using var optimizer = adapter.CreateOptimizer(groups, new OptimizerSettings(0.02, 0.0)) ?? new AdamW(groups);
        Assert.Equal(TestDevice.IsCuda, optimizer is PagedAdamW); // paged on CUDA, ordinary AdamW state on CPU

        var losses = new List<double>();
        for (var step = 0; step < 30; step++)
        {
            using var scope = torch.NewDisposeScope();
            optimizer.zero_grad();
            var loss = model.Loss(x, y);
            loss.backward();
            optimizer.step();
            losses.Add(loss.ToDouble());
        }
        Assert.True(losses[^1] < losses[0] - 0.2, $"loss {losses[0]} -> {losses[^1]}");
        foreach (var (name, copy) in buffers)
            Assert.True(model.named_buffers().Single(b => b.name == name).buffer.Equals(copy), $"{name} changed");
    }

    [Fact]
    public void Save_and_load_round_trip_in_peft_format()
    {
        var dir = Path.Combine(Path.GetTempPath(), "qlora-test-" + Guid.NewGuid().ToString("N")[..8]);
        try
        {
            var x = Tiny.Batch(device: Dev);
            Tensor trained;
            using (var model = Tiny.Model())
            using (var adapter = Attach(model, Options(type: "fp4", dq: false, init: LoraInit.Random)))
            {
                trained = model.Forward(x).DetachFromDisposeScope();
                adapter.Save(dir);
                var keys = adapter.StateDict().Keys.ToList();
                Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", keys);
                Assert.Equal(12, keys.Count);
            }
            Assert.True(File.Exists(Path.Combine(dir, "adapter_config.json")));
            Assert.True(File.Exists(Path.Combine(dir, "adapter_model.safetensors")));
            var qconfig = File.ReadAllText(Path.Combine(dir, "qlora_config.json"));
            Assert.Contains("\"bnb_4bit_quant_type\": \"fp4\"", qconfig);
            Assert.Contains("\"peft_type\": \"LORA\"", File.ReadAllText(Path.Combine(dir, "adapter_config.json")));

            // A fresh model (on the CPU) quantized with the saved settings onto the test device gives the same output.
            using var again = Tiny.Model();
            using var loaded = (QLoraAdapter)new QLoraMethod().Load(again, dir, Dev.ToString());
            var options = (QLoraOptions)loaded.Options;
            Assert.Equal("fp4", options.Bnb4bitQuantType);
            Assert.False(options.Bnb4bitUseDoubleQuant);
            Assert.Equal(4, options.R);
            var output = again.Forward(x);
            Assert.True(output.Equals(trained), $"max diff {(output - trained).abs().max().ToDouble()}");
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Merge_and_unload_gives_a_dense_model_with_the_same_output()
    {
        using var model = Tiny.Model();
        var x = Tiny.Batch(device: Dev);
        using var adapter = Attach(model, Options(init: LoraInit.Random));
        var before = model.Forward(x);
        Assert.True(adapter.CanMerge);
        Assert.Same(model, adapter.MergeAndUnload());
        Assert.DoesNotContain(model.named_modules(), m => m.module is Linear4bit or LoraLinear);
        foreach (var path in adapter.QuantizedPaths)
        {
            var dense = Assert.IsType<Linear>(model.get_submodule(path));
            Assert.Equal(model.DType, dense.weight.dtype);
            Assert.False(dense.weight.requires_grad);
        }
        var after = model.Forward(x);
        // fp32 compute: equal up to summation order; bf16 compute (CUDA): the merged fp32 model skips bf16 roundings.
        var tolerance = Compute == "float32" ? 1e-4 : 3e-2;
        Assert.True(after.allclose(before, tolerance, tolerance), $"max diff {(after - before).abs().max().ToDouble()}");
        // The adapter is spent: the model is an ordinary dense one (its keys are the plain model's).
        Assert.DoesNotContain(model.state_dict().Keys, k => k.Contains("base_layer") || k.Contains("lora_"));
        Assert.Throws<InvalidOperationException>(() => adapter.Save(Path.GetTempPath()));
        Assert.Throws<InvalidOperationException>(() => adapter.MergeAndUnload());
        Assert.False(adapter.CanMerge);
    }

    [Fact]
    public void An_in_place_merge_into_4bit_weights_is_refused_with_a_pointer_to_merge_and_unload()
    {
        using var model = Tiny.Model();
        var x = Tiny.Batch(device: Dev);
        using var adapter = Attach(model, Options(init: LoraInit.Random));
        var before = model.Forward(x);
        var e = Assert.Throws<InvalidOperationException>(() => adapter.Merge());
        Assert.Contains("4-bit", e.Message);
        Assert.Contains("MergeAndUnload", e.Message);
        // Through the LoRA adapter underneath too, and nothing changed.
        Assert.Throws<InvalidOperationException>(() => adapter.Lora.Merge());
        Assert.False(adapter.Lora.IsMerged);
        Assert.True(model.Forward(x).Equals(before));
    }

    [Fact]
    public void Unload_removes_the_adapters_and_keeps_the_4bit_base()
    {
        using var model = Tiny.Model();
        var x = Tiny.Batch(device: Dev);
        using var adapter = Attach(model, Options(init: LoraInit.Random));
        var adapted = model.Forward(x);
        Tensor quantizedOnly;
        using (adapter.DisableAdapter())
        {
            quantizedOnly = model.Forward(x);
            Assert.False(quantizedOnly.allclose(adapted, 1e-4, 1e-4));
        }
        Assert.True(model.Forward(x).Equals(adapted)); // enabled again after the scope
        Assert.Same(model, adapter.Unload());
        Assert.DoesNotContain(model.named_modules(), m => m.module is LoraLinear);
        Assert.Equal(6, model.named_modules().Count(m => m.module is Linear4bit));
        Assert.True(model.Forward(x).Equals(quantizedOnly));
    }

    [Fact]
    public void Double_quantization_shrinks_the_stored_model_as_predicted()
    {
        using var a = Tiny.Model();
        using var b = Tiny.Model();
        using var plain = Attach(a, Options(dq: false));
        using var nested = Attach(b, Options(dq: true));
        long n = 6L * Tiny.Hidden * Tiny.Hidden;
        Assert.Equal(4.5, plain.QuantizedWeightBytes * 8.0 / n, 6);
        // 4 + 8/64 bits, plus one fp32 scale per 256 absmax values (padded per layer here: 64 absmax per layer).
        Assert.Equal(n / 2 + 6 * 256 + 6 * 4, nested.QuantizedWeightBytes);
    }

    [Fact]
    public void Options_bind_from_transformers_names()
    {
        using var model = Tiny.Model();
        IAdapterMethod method = new QLoraMethod();
        using var adapter = (QLoraAdapter)method.Attach(model, new
        {
            r = 2, lora_alpha = 4, target_modules = new[] { "q_proj", "v_proj" }, bnb_4bit_quant_type = "fp4",
            bnb_4bit_use_double_quant = false, bnb_4bit_compute_dtype = Compute, bnb_4bit_blocksize = 32, device = Dev.ToString(),
            paged_optimizer = false,
        });
        Assert.Equal(6, adapter.QuantizedPaths.Count); // every Linear is quantized, adapters only where targeted
        Assert.Equal(4, adapter.Lora.Layers.Count);
        var q = (Linear4bit)((LoraLinear)model.get_submodule("model.layers.0.self_attn.q_proj")!).base_layer;
        Assert.Equal("fp4", q.quant_type);
        Assert.Equal(32, q.blocksize);
        Assert.IsType<Linear4bit>(model.get_submodule("model.layers.0.self_attn.o_proj"));
        Assert.Null(adapter.CreateOptimizer(adapter.ParameterGroups(1e-3, 0), new OptimizerSettings(1e-3, 0)));
    }

    [Theory]
    [InlineData("bnb_4bit_quant_type", "int4")]
    [InlineData("bnb_4bit_blocksize", 63)]
    [InlineData("bnb_4bit_compute_dtype", "float8")]
    [InlineData("device", "tpu")]
    [InlineData("r", 0)]
    [InlineData("lora_dropout", 1.5)]
    public void Bad_options_are_clear_errors_and_leave_the_model_untouched(string option, object value)
    {
        using var model = Tiny.Model();
        var options = new Dictionary<string, object?> { [option] = value };
        var e = Assert.Throws<AdapterConfigurationException>(() => new QLoraMethod().Attach(model, (object)options));
        Assert.Contains(option, e.Message);
        Assert.DoesNotContain(model.named_modules(), m => m.module is Linear4bit);
    }

    [Fact]
    public void Targets_that_match_nothing_fail_before_quantizing()
    {
        using var model = Tiny.Model();
        var o = Options();
        o.TargetModules = new[] { "gate_proj" };
        var e = Assert.Throws<AdapterConfigurationException>(() => Attach(model, o));
        Assert.Contains("target_modules", e.Message);
        Assert.Contains("q_proj", e.Message);
        Assert.DoesNotContain(model.named_modules(), m => m.module is Linear4bit);
    }

    [Fact]
    public void A_cpu_model_is_quantized_layer_by_layer_onto_the_gpu()
    {
        if (!TestDevice.IsCuda) return; // needs a GPU
        using var model = Tiny.Model(dtype: ScalarType.BFloat16); // built on the CPU
        Assert.Equal("cpu", model.Device.ToString());
        using var adapter = Attach(model, Options());
        Assert.Equal(Dev.ToString(), model.Device.ToString());
        Assert.All(model.named_buffers(), b => Assert.True(b.buffer.is_cuda, b.name));
        Assert.All(model.parameters(), p => Assert.True(p.is_cuda));
        var x = Tiny.Batch(device: Dev);
        using var scope = torch.NewDisposeScope();
        var loss = model.Loss(x, x);
        loss.backward();
        Assert.True(double.IsFinite(loss.ToDouble()));
    }

    /// <summary>A dense linear map computing as Linear4bit does: input cast to the compute dtype, output cast back.</summary>
    private sealed class DequantizedLinear : nn.Module<Tensor, Tensor>
    {
        private readonly ScalarType compute;
        private readonly Tensor weight; // a buffer

        public DequantizedLinear(Tensor weight, ScalarType compute) : base("DequantizedLinear")
        {
            this.compute = compute;
            this.weight = weight.DetachFromDisposeScope();
            RegisterComponents();
        }

        public override Tensor forward(Tensor input)
        {
            using var scope = torch.NewDisposeScope();
            var y = torch.nn.functional.linear(input.to(compute), weight);
            return y.to(input.dtype).MoveToOuterDisposeScope();
        }
    }
}
