using LoRAHub.Abstractions;

[assembly: AdapterPlugin(ContractVersion.Major, ContractVersion.Minor)]
