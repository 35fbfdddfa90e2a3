"""What the stages measure: evaluation, heat maps, GAN metrics, the linear probe."""
