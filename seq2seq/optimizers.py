"""Adam with TensorFlow's fused update kernel."""

import keras
import tensorflow as tf

from seq2seq import keras_compat


@keras.saving.register_keras_serializable(package="seq2seq")
class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam whose per-variable update is TensorFlow's one-pass `ResourceApplyAdam`.

    Keras's Adam updates each variable with about a dozen element-wise ops, each a full pass
    over the variable and its two slots (15 ms against 7 ms for 13.6M parameters on this
    2-core CPU). The fused kernel computes the same update (same formula, slots and epsilon placement)
    in one pass. Other backends, `amsgrad` and non-float32 variables take Keras's path.
    Variables, slots, config and checkpoints are those of keras.optimizers.Adam.
    """

    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow" or self.amsgrad or variable.dtype != "float32":
            return super().update_step(gradient, variable, learning_rate)
        momentum, velocity = keras_compat.adam_slots(self, variable)
        step = tf.cast(self.iterations + 1, tf.float32)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=momentum.handle,
            v=velocity.handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, tf.float32), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, tf.float32), step),
            lr=tf.cast(learning_rate, tf.float32),
            beta1=tf.cast(self.beta_1, tf.float32),
            beta2=tf.cast(self.beta_2, tf.float32),
            epsilon=tf.cast(self.epsilon, tf.float32),
            grad=tf.convert_to_tensor(tf.cast(gradient, tf.float32)),
            use_locking=False,
        )
