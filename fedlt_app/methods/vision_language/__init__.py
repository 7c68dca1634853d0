"""Methods on a frozen vision-language backbone (CLIP, optional extra ``clip``): zero-shot and prompt tuning."""
